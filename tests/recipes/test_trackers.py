"""[logging] report_to: each tracker holds exactly the numbers of metrics.jsonl.

TensorBoard is checked through one real tiny SFT run (its event files read back with
TensorBoard's own reader); W&B (offline, its run file read back), MLflow (the run
directory's SQLite store, read back with ``MlflowClient``) and trackio (its local
database) through the metrics log a recipe writes, fed a fixed list of records. No
network anywhere. A tracker that cannot start stops ``vlmtune train`` with exit 2
before the model loads; one that fails mid-run is dropped with one warning.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.recipes.test_sft import job_file
from vlmtune.cli import app
from vlmtune.config import ConfigError, JobFile, load_job
from vlmtune.recipes.run_dir import METRICS_FILE, RunDir
from vlmtune.recipes.tracker_backends import MLflow, RunInfo
from vlmtune.recipes.trackers import STATE_FILE, server_job_problems

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
Points = dict[tuple[str, int], float]

# What a recipe writes: train steps, an eval at a step, a NaN (null in metrics.jsonl),
# a non-number. total_steps is added by the metrics log.
RECORDS: list[dict[str, Any]] = [
    {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.25, "weighted_tokens": 16},
    {"step": 2, "loss": 2.0, "learning_rate": 5e-5, "grad_norm": math.nan, "weighted_tokens": 8},
    {"step": 2, "eval/loss": 1.75, "eval/accuracy": 0.5, "eval/n": 3, "note": "text"},
    {"step": 3, "loss": 1.5, "learning_rate": 0.0, "grad_norm": 0.5, "weighted_tokens": 16},
]


def tiny_job(tmp_path: Path, logging: str) -> JobFile:
    path = tmp_path / "job.toml"
    path.write_text(
        f'[job]\nmodel = "tiny-qwen3-vl"\ndata = "train.jsonl"\nname = "tiny"\n[logging]\n{logging}\n'
    )
    return load_job(path)


def write_records(job: JobFile, run_dir: Path, records: list[dict[str, Any]]) -> RunDir:
    """What a recipe does: start the trackers, write every record, close them."""
    run = RunDir(run_dir, main=True, log=lambda line: print(line, file=sys.stderr))
    run.start_trackers(job)
    metrics = run.metrics(None, total_steps=3)
    for record in records:
        metrics.write(dict(record))
    run.trackers.close()
    return run


def jsonl_points(run_dir: Path) -> Points:
    """(name, step) -> value of every number metrics.jsonl holds, but step and total_steps."""
    points: Points = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key in ("step", "total_steps") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                points[(key, record["step"])] = float(value)
    return points


def assert_same(got: Points, expected: Points) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key  # TensorBoard keeps float32


# -- the schema ----------------------------------------------------------------------------


def test_report_to_names_known_trackers(tmp_path):
    assert tiny_job(tmp_path, "").logging.report_to == []
    job = tiny_job(tmp_path, 'report_to = "wandb"')  # one name, or a list; twice is once
    assert job.logging.report_to == ["wandb"]
    job = tiny_job(tmp_path, 'report_to = ["mlflow", "tensorboard", "mlflow"]')
    assert job.logging.report_to == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError) as e:
        tiny_job(tmp_path, 'report_to = ["tensorboard", "comet"]')
    assert "logging.report_to: unknown tracker 'comet'" in str(e.value)
    assert "tensorboard, wandb, mlflow or trackio" in str(e.value)


# -- TensorBoard, through a real run -------------------------------------------------------


def tensorboard_points(folder: Path) -> tuple[Points, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    points = {
        (tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)
    }
    return points, events.Tags()["tensors"]


def test_tensorboard_holds_every_number_of_a_real_run(tmp_path):
    toml = job_file(tmp_path, extra='[logging]\nreport_to = ["tensorboard"]\n')
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "-c",
            str(toml),
            "-o",
            str(out),
            "hyperparameters.max_steps=2",
            "hyperparameters.save_every=0",
            "hyperparameters.eval_every=1",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "experiment tracking: tensorboard" in result.output
    points, texts = tensorboard_points(out / "tensorboard")
    expected = jsonl_points(out)
    assert {"loss", "learning_rate", "grad_norm", "eval/loss", "eval/accuracy"} <= {
        key for key, _ in expected
    }
    assert {step for _, step in expected} == {1, 2}
    assert_same(points, expected)
    assert "config/text_summary" in texts  # the job as it ran
    assert json.loads((out / STATE_FILE).read_text())["tensorboard"]["log_dir"] == str(
        out / "tensorboard"
    )


def test_tensorboard_resumed_hides_the_steps_after_the_checkpoint(tmp_path):
    job = tiny_job(tmp_path, 'report_to = ["tensorboard"]')
    run_dir = tmp_path / "run"
    write_records(job, run_dir, RECORDS)
    # Resumed from step 2: metrics.jsonl keeps steps 1-2; step 3 is trained again.
    run = RunDir(run_dir, main=True)
    run.resume_from = "checkpoints/step-2"
    run.start_trackers(job)
    run.metrics(resume_step=2, total_steps=3).write({"step": 3, "loss": 0.25})
    run.trackers.close()
    points, _ = tensorboard_points(run_dir / "tensorboard")
    assert_same(points, jsonl_points(run_dir))
    assert points[("loss", 3)] == 0.25 and points[("loss", 1)] == 2.5


# -- W&B offline -----------------------------------------------------------------------


def wandb_run_file(run_dir: Path, timeout_s: float = 30.0) -> list[Any]:
    """The records of the one offline run under ``run_dir/wandb``, once its ``exit``
    record is there (wandb's own process may still be writing the file when
    ``finish`` returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        records = wandb_records(path.read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s}s"
        time.sleep(0.2)


def wandb_records(data: bytes) -> list[Any]:
    """The protobuf ``Record``s of a W&B run file: a LevelDB-style log (32 KiB blocks
    of chunks, each with a 7-byte header) after a 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_every_number_and_the_config(tmp_path):
    job = tiny_job(tmp_path, 'report_to = ["wandb"]\nwandb_mode = "offline"\ntags = ["t1"]')
    run_dir = tmp_path / "run"
    write_records(job, run_dir, RECORDS)
    records = wandb_run_file(run_dir)
    points: Points = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {  # "eval/loss" may be stored as the nested key ["eval", "loss"]
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item
            }
            points.update(
                {(k, row["step"]): v for k, v in row.items() if k != "step" and k[0] != "_"}
            )
    assert_same(points, jsonl_points(run_dir))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["hyperparameters"]["learning_rate"] == job.hyperparameters.learning_rate
    assert (run.project, run.display_name, list(run.tags)) == ("tiny", "run", ["t1"])
    assert json.loads((run_dir / STATE_FILE).read_text())["wandb"]["id"] == run.run_id


# -- MLflow -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: a new one runs MLflow's schema migrations
    (seconds). A job's default store is the run directory's (``test_mlflow_default_store``)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates and migrates it
    return uri


def mlflow_points(uri: str, run_id: str) -> Points:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {
        (key, m.step): m.value
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
    }


def test_mlflow_default_store_is_in_the_run_directory(tmp_path):
    job = tiny_job(tmp_path, 'report_to = ["mlflow"]')
    info = RunInfo(job.logging, tmp_path / "run", "p", "r", {}, "", resumed=False)
    uri, artifacts = MLflow.tracking_uri(info)
    if "MLFLOW_TRACKING_URI" in os.environ:  # the user's own server or store wins
        assert (uri, artifacts) == (os.environ["MLFLOW_TRACKING_URI"], None)
    else:
        assert uri == f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}"
        assert artifacts == tmp_path / "run" / "mlartifacts"


def test_mlflow_run_holds_every_number_and_resumes_the_same_run(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    job = tiny_job(
        tmp_path, f'report_to = ["mlflow"]\ntags = ["t1"]\nmlflow_tracking_uri = "{mlflow_uri}"'
    )
    run_dir = tmp_path / "run"
    write_records(job, run_dir, RECORDS[:2])
    state = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]
    assert state["tracking_uri"] == mlflow_uri
    # A resume continues the same MLflow run (metrics.jsonl keeps steps 1-2).
    run = RunDir(run_dir, main=True)
    run.resume_from = "checkpoints/step-2"
    run.start_trackers(job)
    metrics = run.metrics(resume_step=2, total_steps=3)
    for record in RECORDS[2:]:
        metrics.write(dict(record))
    run.trackers.close()
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"] == state
    assert_same(mlflow_points(mlflow_uri, state["run_id"]), jsonl_points(run_dir))
    found = MlflowClient(mlflow_uri).get_run(state["run_id"])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["hyperparameters.learning_rate"] == "0.0001"
    assert found.data.params["logging.report_to"] == '["mlflow"]'
    assert "t1" in found.data.tags


def test_a_bad_mlflow_uri_is_a_config_error_naming_the_key(tmp_path):
    job = tiny_job(tmp_path, 'report_to = ["mlflow"]\nmlflow_tracking_uri = "nosuch://x"')
    with pytest.raises(ConfigError) as e:
        RunDir(tmp_path / "run", main=True).start_trackers(job)
    assert "logging.report_to: mlflow could not start: nosuch://x" in str(e.value)


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    logging = f'report_to = ["mlflow", "tensorboard"]\nmlflow_tracking_uri = "{mlflow_uri}"'
    job = tiny_job(tmp_path, logging)
    said: list[str] = []
    run = RunDir(tmp_path / "run", main=True, log=said.append)
    run.start_trackers(job)
    metrics = run.metrics(None, total_steps=3)
    metrics.write(dict(RECORDS[0]))
    state = json.loads((run.path / STATE_FILE).read_text())["mlflow"]
    MlflowClient(state["tracking_uri"]).delete_run(state["run_id"])  # logging now fails
    for record in RECORDS[1:]:
        metrics.write(dict(record))
    run.trackers.close()
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and "logging.report_to: mlflow failed" in warnings[0]
    assert "off for the rest of this run" in warnings[0]
    points, _ = tensorboard_points(run.path / "tensorboard")  # the other one went on
    assert_same(points, jsonl_points(run.path))


def test_only_the_main_process_starts_trackers(tmp_path):
    job = tiny_job(tmp_path, 'report_to = ["tensorboard"]')
    run = RunDir(tmp_path / "run", main=False)
    run.start_trackers(job)
    run.metrics(None, 3).write({"step": 1, "loss": 1.0})
    assert not run.trackers and not (run.path / "tensorboard").exists()


# -- trackio, in a process of its own (its folder is read once, at import) ------------------

TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
from tests.recipes.test_trackers import RECORDS, tiny_job, write_records
from trackio.sqlite_storage import SQLiteStorage
tmp = Path(sys.argv[1])
job = tiny_job(tmp, 'report_to = ["trackio"]')
write_records(job, tmp / "run", RECORDS)
logs = SQLiteStorage.get_logs("tiny", "run")
config = SQLiteStorage.get_run_config("tiny", "run")
print(json.dumps({"logs": logs, "lr": config["hyperparameters"]["learning_rate"]}))
"""


def test_trackio_local_run_holds_every_number_and_the_config(tmp_path):
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only the JSON on stdout: trackio's banners went to stderr.
    out = json.loads(proc.stdout)
    points = {
        (k, log["step"]): v for log in out["logs"] for k, v in log.items()
        if k not in ("step", "timestamp")
    }  # fmt: skip
    assert_same(points, jsonl_points(tmp_path / "run"))
    assert out["lr"] == 1e-4
    assert (tmp_path / "trackio" / "tiny.db").exists()


# -- a tracker that cannot start: exit 2 before the model loads -------------------------------

BLOCK_MLFLOW = "import sys; sys.modules['mlflow'] = None; from vlmtune.cli import main; main()"


def test_trackers_that_cannot_start_stop_train_before_the_model_loads(tmp_path):
    # W&B online with no key anywhere, and MLflow as if not installed (an import of a
    # module set to None in sys.modules fails as a missing one does).
    toml = job_file(tmp_path, extra='[logging]\nreport_to = ["wandb", "mlflow"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wb"),
               OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_MLFLOW, "train", "-c", str(toml), "-o", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "logging.report_to: wandb could not start: no W&B API key" in proc.stderr
    assert (
        "logging.report_to: mlflow could not start: the mlflow package is not installed "
        "(pip install 'vlmtune[mlflow]')"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "parameters train" not in proc.stderr  # the model never loaded
    assert not (tmp_path / "run" / METRICS_FILE).exists()


# -- a job on a server -------------------------------------------------------------------------


def test_a_server_job_keeps_its_tracker_files_in_its_folder(tmp_path):
    job_dir = tmp_path / "jobs" / "j1"
    job_dir.mkdir(parents=True)
    job = tiny_job(tmp_path, 'report_to = ["tensorboard", "mlflow"]\nlog_dir = "tb"')
    assert server_job_problems(job, job_dir) == []
    assert job.logging.log_dir == str(job_dir.resolve() / "tb")
    for bad, key in [
        ('log_dir = "/tmp/elsewhere"', "logging.log_dir"),
        ('log_dir = "../../out"', "logging.log_dir"),
        ('mlflow_tracking_uri = "sqlite:////tmp/m.db"', "logging.mlflow_tracking_uri"),
    ]:
        job = tiny_job(tmp_path, f'report_to = ["mlflow"]\n{bad}')
        (problem,) = server_job_problems(job, job_dir)
        assert problem.startswith(f"{key}: ") and "outside the job's folder" in problem
    job = tiny_job(tmp_path, 'report_to = ["mlflow"]\nmlflow_tracking_uri = "http://mlflow:5000"')
    assert server_job_problems(job, job_dir) == []
