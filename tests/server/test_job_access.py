"""A TOML job submitted to the server is validated before it is queued, reads only its
uploads and the folders the operator allows, and writes only in its own folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.server.test_files import multipart
from tests.server.test_jobs import JOB, job_file, write_rows
from vlmtune.cli import app
from vlmtune.config import ConfigError, load_job
from vlmtune.sdk.http import RemoteError
from vlmtune.sdk.jobs import JobsClient
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key
from vlmtune.server.files import FileStore
from vlmtune.server.job_access import DataAccess, resolved_roots, validated_job
from vlmtune.server.store import Store

runner = CliRunner()
BASE = '[job]\nmodel = "tiny-qwen3-vl"\ndata = "{data}"\n'


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed folder holding a dataset, a link to it, and a link out of the folder."""
    top = tmp_path_factory.mktemp("access")
    root, outside = top / "allowed", top / "outside"
    root.mkdir()
    outside.mkdir()
    write_rows(root / "train.jsonl", 2)
    write_rows(outside / "secret.jsonl", 2)
    (root / "same.jsonl").symlink_to(root / "train.jsonl")
    (root / "escape.jsonl").symlink_to(outside / "secret.jsonl")
    return root


@pytest.fixture(scope="module")
def rooted(allowed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsClient]:
    """A server that lets jobs read ``allowed`` (only refused jobs are sent to it)."""
    with ServerThread(tmp_path_factory.mktemp("srv"), allowed_data_roots=(allowed,)) as srv:
        yield JobsClient(srv.url, create_key(srv.context.store))


def refused(client: JobsClient, config: str, type_: str = "sft") -> list[str]:
    before = len(client.list())
    with pytest.raises(RemoteError) as err:
        client.submit_toml(config, type_)
    assert err.value.status == 400
    assert len(client.list()) == before  # nothing queued
    problems = getattr(err.value, "problems", None)
    assert problems is not None and all(p in err.value.message for p in problems)
    return problems


def test_every_config_problem_is_listed_by_key_and_nothing_is_queued(server, key):
    client = JobsClient(server.url, key)
    config = '[job]\nmodel = "tiny-qwen3-vl"\n[hyperparameters]\nbogus = 1\nn_epochs = 0\n'
    problems = refused(client, config)
    assert [p.split(":")[0] for p in problems] == [
        "job.data",
        "hyperparameters.n_epochs",
        "hyperparameters.bogus",
    ]
    assert "unknown key" in problems[2]
    jobs_dir = server.config.data_dir / "jobs"
    before = set(jobs_dir.iterdir()) if jobs_dir.exists() else set()
    assert refused(client, "not = [toml")[0].startswith("not valid TOML")
    assert (set(jobs_dir.iterdir()) if jobs_dir.exists() else set()) == before


@pytest.mark.parametrize(
    "data, why",
    [
        ("/etc/passwd", "is outside the folders"),
        ("{root}/../outside/secret.jsonl", "resolves (symlinks and .. followed) outside"),
        ("{root}/escape.jsonl", "resolves (symlinks and .. followed) outside"),
        ("train.jsonl", "is a relative path"),
        ("file-000000000000000000000000", "no uploaded file 'file-000000000000000000000000'"),
    ],
)
def test_data_the_job_may_not_read_is_refused_naming_the_key(rooted, allowed, data, why):
    (problem,) = refused(rooted, BASE.format(data=data.format(root=allowed)))
    assert problem.startswith("job.data: ") and why in problem


def test_every_read_and_write_path_is_checked(rooted, allowed):
    config = (
        BASE.format(data=allowed / "train.jsonl")
        + f'validation_data = "{allowed}/escape.jsonl"\nimage_root = "/etc"\n'
        + 'output_dir = "/tmp/elsewhere"\n[training]\nimage_cache_dir = "../../cache"\n'
    )
    problems = refused(rooted, config)
    assert [p.split(":")[0] for p in problems] == [
        "job.validation_data",
        "job.image_root",
        "job.output_dir",
        "training.image_cache_dir",
    ]
    model = refused(rooted, config.replace('"tiny-qwen3-vl"', '"/etc"').split("validation")[0])
    assert model[0].startswith("job.model: '/etc' is outside")


def test_rl_jobs_on_the_server_use_a_built_in_reward(rooted, allowed):
    config = (
        BASE.format(data=allowed / "train.jsonl")
        + '[algorithm]\ntype = "online"\nmethod = "rl"\n[rl]\nreward = "os:system"\n'
    )
    assert refused(rooted, config, "rl")[0].startswith("rl.reward: 'os:system' would run code")
    regex = refused(rooted, config.replace("os:system", "regex_match"), "rl")
    assert regex[0].startswith("rl.reward: regex_match needs rl.reward_regex")


def test_an_allowed_folder_and_an_upload_are_read_from_their_real_paths(allowed, tmp_path):
    store = FileStore(Store(tmp_path / "server.db"), tmp_path / "data")
    content_type, body = multipart({}, ("val.jsonl", (allowed / "train.jsonl").read_bytes()))
    file_id, upload = store.begin(content_type)
    upload.write(body)
    uploaded = store.add(file_id, upload)
    access = DataAccess(resolved_roots([allowed], tmp_path / "data"), store)
    job_dir = tmp_path / "data" / "jobs" / "job-1"
    job_dir.mkdir(parents=True)
    config = (
        BASE.format(data=allowed / "same.jsonl")  # a link that stays in the folder
        + f'validation_data = "{file_id}"\noutput_dir = "runs"\n'
        + '[training]\nimage_cache_dir = "cache"\n'
    )
    job, file_ids = validated_job(config, "sft", ["job.name=x"], job_dir, access)
    assert job.job.data == str(allowed / "train.jsonl")
    assert job.job.validation_data == uploaded["path"] and file_ids == [file_id]
    assert job.job.output_dir == str(job_dir.resolve())
    assert job.training.image_cache_dir == str(job_dir.resolve() / "cache")
    assert (job_dir / "submitted.toml").read_text() == config and job.job.name == "x"
    # Another tenant's upload is unknown to the job.
    with pytest.raises(ConfigError, match=f"job.validation_data: no uploaded file '{file_id}'"):
        validated_job(config, "sft", [], job_dir, access, tenant="someone-else")


def test_allowed_folders_may_not_overlap_the_data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for root in (tmp_path, data / "files", tmp_path / "missing"):
        result = runner.invoke(
            app, ["serve", "--data-dir", str(data), "--allow-data-root", str(root)]
        )
        assert result.exit_code == 2 and "--allow-data-root" in result.output, result.output


def test_train_server_uploads_the_data_and_the_job_reads_the_uploaded_copy(server, key, tmp_path):
    config = job_file(tmp_path)  # data = "train.jsonl": relative to the job file's folder
    write_rows(tmp_path / "val.jsonl", 2)
    (tmp_path / "job.toml").write_text(JOB.replace("[hyperparameters]", 'validation_data = "val.jsonl"\n[hyperparameters]'))  # fmt: skip
    res = runner.invoke(
        app,
        ["train", "--config", str(config), "--server", server.url, "hyperparameters.max_steps=1",
         "job.name=uploaded", "training.image_cache_dir=/somewhere/on/my/laptop"],
        env={"VLMTUNE_API_KEY": key},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # (uploaded, or found there already: test_jobs.py uploads the same train.jsonl)
    assert "job.data: " in res.stderr and "job.validation_data: " in res.stderr
    job_id = res.stdout.strip().splitlines()[-1]
    for name in ("train.jsonl", "val.jsonl"):  # the job cannot be reading these
        os.remove(tmp_path / name)
    client = JobsClient(server.url, key)
    file_ids = client.get(job_id)["config"]["files"]
    assert len(file_ids) == 2
    file_id = file_ids[1]  # val.jsonl
    with pytest.raises(RemoteError, match=job_id):  # in use
        client.delete_file(file_id)
    list(client.follow(job_id, poll_s=5.0))
    job = client.get(job_id)
    assert job["state"] == "succeeded", job["error"]

    run_dir = Path(server.context.jobs.get(job_id)["run_dir"])
    ran = load_job(run_dir.parent / "config.toml")
    stored = [Path(server.context.jobs.files.get(f)["path"]) for f in file_ids]
    assert [Path(ran.job.data), Path(ran.job.validation_data)] == stored
    assert all(p.is_relative_to(server.config.data_dir / "files") for p in stored)
    report = json.loads((run_dir / "validation_report.json").read_text())
    assert [report["train"]["path"], report["validation"]["path"]] == [str(p) for p in stored]
    assert Path(ran.training.image_cache_dir).is_relative_to(run_dir.parent)
    client.delete_file(file_id)  # the job has ended


def test_train_server_exits_2_listing_what_the_server_refused(server, key, tmp_path):
    config = job_file(tmp_path)
    res = runner.invoke(
        app,
        ["train", "--config", str(config), "--server", server.url, f"job.image_root={tmp_path}"],
        env={"VLMTUNE_API_KEY": key},
    )
    assert res.exit_code == 2, res.output
    assert "the server refused" in res.stderr and f"  - job.image_root: '{tmp_path}'" in res.stderr
