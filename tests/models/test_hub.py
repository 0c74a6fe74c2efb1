"""Hub downloads, offline: a local HTTP server stands in for the Hugging Face hub.

It answers the three calls ``snapshot_download`` makes (huggingface_hub 1.x / 2.x):
``GET /api/models/{repo}/revision/{rev}`` (the commit sha), ``GET
/api/models/{repo}/tree/{sha}`` (the file list) and ``HEAD``/``GET
/{repo}/resolve/{sha}/{file}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``, body),
and serves the tiny model's files. No test here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from vlmtune.config import load_job
from vlmtune.models.hub import ModelNotCachedError
from vlmtune.models.loading import ModelNotFoundError, load_model, resolve_model_path
from vlmtune.models.registry import get_model_spec

REPO = "vlmtune-test/tiny-qwen3-vl"
MAIN_SHA = "a" * 40
PINNED_SHA = "b" * 40
# What a real repo also carries and a training run never reads.
EXTRAS = {"pytorch_model.bin": b"\0" * 64, "model.gguf": b"\0" * 64, "README.md": b"# tiny\n"}


@dataclass
class FakeHub:
    """Repos (id -> {file: bytes}), their revisions, and every request seen."""

    repos: dict[str, dict[str, bytes]]
    revisions: dict[str, str] = field(
        default_factory=lambda: {"main": MAIN_SHA, "v1.0": PINNED_SHA}
    )
    requests: list[tuple[str, str]] = field(default_factory=list)
    authorizations: set[str | None] = field(default_factory=set)
    delay_s: float = 0.0  # per file body, to hold a download open
    url: str = ""

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p in self.requests if method is None or m == method]

    def file_gets(self) -> list[str]:
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                if hub.delay_s:
                    time.sleep(hub.delay_s)
                self.wfile.write(payload)

        def _error(self, code: str, body: bool) -> None:
            self._send(404, b'{"error": "not found"}', {"X-Error-Code": code}, body)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            hub.authorizations.add(self.headers.get("Authorization"))
            parts = path.strip("/").split("/")
            if len(parts) < 5:  # nothing else the hub serves is needed here
                return self._error("EntryNotFound", body)
            if parts[:2] == ["api", "models"]:
                repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
                files = hub.repos.get(repo)
                if files is None:
                    return self._error("RepoNotFound", body)
                sha = rev if rev in hub.revisions.values() else hub.revisions.get(rev)
                if sha is None:
                    return self._error("RevisionNotFound", body)
                if kind == "revision":
                    info = {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}
                    payload = json.dumps(info).encode()
                else:  # tree
                    tree = [
                        {"type": "file", "path": f, "size": len(data), "oid": _sha(data)}
                        for f, data in files.items()
                    ]
                    payload = json.dumps(tree).encode()
                return self._send(200, payload, {"Content-Type": "application/json"}, body)
            # /{owner}/{name}/resolve/{sha}/{file}
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            data = hub.repos.get(repo, {}).get(name)
            if data is None:
                return self._error("EntryNotFound", body)
            headers = {"X-Repo-Commit": rev, "ETag": f'"{_sha(data)}"'}
            self._send(200, data, headers, body)

    return Handler


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tiny_files() -> dict[str, bytes]:
    from vlmtune.models.tiny import tiny_model_dir

    return {p.name: p.read_bytes() for p in sorted(tiny_model_dir().iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_files() -> dict[str, bytes]:
    return _tiny_files()


@pytest.fixture
def hub(
    tiny_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    """A fake hub on 127.0.0.1 with an empty cache in tmp_path, and the env pointing at both."""
    fake = FakeHub(repos={REPO: {**tiny_files, **EXTRAS}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.chdir(tmp_path)
    yield fake
    server.shutdown()
    server.server_close()


def test_first_use_downloads_then_loads_a_working_model(hub: FakeHub, tmp_path: Path) -> None:
    lm = load_model(REPO)
    assert lm.path.is_relative_to(tmp_path / "hf-cache")
    assert lm.path.name == MAIN_SHA
    # Only what loading needs: not the .bin / .gguf copies, not the README.
    fetched = {p.rsplit("/", 1)[-1] for p in hub.file_gets()}
    assert fetched == {f for f in hub.repos[REPO] if f not in EXTRAS}
    assert not any((lm.path / f).exists() for f in EXTRAS)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, lm.model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_cached_model_resolves_offline_without_asking_the_hub(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = resolve_model_path(REPO, download=True)
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path(REPO) == first
    assert resolve_model_path(REPO, download=True) == first
    assert len(hub.requests) == seen


def test_hf_token_is_sent(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    resolve_model_path(REPO, download=True)
    assert hub.authorizations == {"Bearer hf_test_token"}


def test_interrupted_download_resumes_with_the_missing_files_only(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = resolve_model_path(REPO, download=True)
    (snapshot / "model.safetensors").resolve().unlink()  # as if killed before the last shard
    (snapshot / "model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline mode is on"):  # not taken as complete
        resolve_model_path(REPO, download=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.requests.clear()
    assert resolve_model_path(REPO, download=True) == snapshot
    assert [p.rsplit("/", 1)[-1] for p in hub.file_gets()] == ["model.safetensors"]
    assert (snapshot / "model.safetensors").is_file()


def test_uncached_model_offline_is_a_clear_error(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path(REPO, download=True)
    message = str(e.value)
    assert REPO in message
    assert "not in the Hugging Face cache" in message and "offline mode is on" in message
    assert str(tmp_path / "hf-cache") in message  # the cache it looked in
    assert str(tmp_path / REPO) in message  # and the directory it tried
    assert not isinstance(e.value, ModelNotCachedError)  # offline: no download would help
    assert hub.requests == []


def test_without_download_an_uncached_id_is_refused_untouched(hub: FakeHub) -> None:
    with pytest.raises(ModelNotCachedError, match="hf download vlmtune-test/tiny-qwen3-vl"):
        resolve_model_path(REPO)
    assert hub.requests == []


def test_pinned_revision_is_requested_and_kept_apart(hub: FakeHub) -> None:
    pinned = resolve_model_path(REPO, revision="v1.0", download=True)
    assert f"/api/models/{REPO}/revision/v1.0" in hub.paths("GET")
    assert pinned.name == PINNED_SHA
    assert all(f"/resolve/{PINNED_SHA}/" in p for p in hub.file_gets())
    assert resolve_model_path(REPO, download=True).name == MAIN_SHA  # main is another snapshot


def test_hub_failures_name_the_cause(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFoundError, match=r"has no revision 'v9' \(job.revision\)"):
        resolve_model_path(REPO, revision="v9", download=True)
    with pytest.raises(ModelNotFoundError, match="no such repository") as e:
        resolve_model_path("vlmtune-test/missing", download=True)
    assert hub.url in str(e.value)


def test_concurrent_processes_download_once(hub: FakeHub) -> None:
    """Two callers at once (torchrun's local ranks): one downloads, the other waits."""
    hub.delay_s = 0.2  # the first download is still running when the second caller asks
    start = threading.Barrier(2)
    results: list[Path] = []

    def resolve() -> None:
        start.wait()
        results.append(resolve_model_path(REPO, download=True))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1]
    assert hub.paths("GET").count(f"/api/models/{REPO}/revision/main") == 1
    assert len(hub.file_gets()) == len(set(hub.file_gets()))


def test_hosted_resource_name_maps_to_its_hub_id(
    hub: FakeHub, tiny_files: dict[str, bytes]
) -> None:
    hosted = "accounts/fireworks/models/qwen3-vl-2b-instruct"
    assert get_model_spec(hosted).name == "Qwen/Qwen3-VL-2B-Instruct"
    hub.repos["Qwen/Qwen3-VL-2B-Instruct"] = tiny_files  # the tiny files stand in for it
    path = resolve_model_path(hosted, download=True)
    assert "models--Qwen--Qwen3-VL-2B-Instruct" in path.parts
    assert "/api/models/Qwen/Qwen3-VL-2B-Instruct/revision/main" in hub.paths("GET")


def test_unknown_names_say_where_they_looked(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path("qwen3-vl-9b")
    assert str(tmp_path / "qwen3-vl-9b") in str(e.value)
    assert "Qwen/Qwen3-VL-8B-Instruct" in str(e.value)  # the names it knows
    with pytest.raises(ModelNotFoundError, match="hosted names vlmtune maps"):
        resolve_model_path("accounts/fireworks/models/qwen3-vl-9b-instruct")
    assert hub.requests == []


def _job(tmp_path: Path, model: str, extra: str = "") -> Path:
    (tmp_path / "train.jsonl").write_text("{}\n")  # not empty: `vlmtune train` refuses that
    toml = tmp_path / "job.toml"
    toml.write_text(f'[job]\nmodel = "{model}"\ndata = "train.jsonl"\n{extra}')
    return toml


def test_train_refuses_an_unavailable_model_before_any_work(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from vlmtune.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["train", "--config", str(_job(tmp_path, REPO))])
    assert result.exit_code == 2
    assert "job.model: model 'vlmtune-test/tiny-qwen3-vl' not found" in result.output
    assert "offline mode is on" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    result = CliRunner().invoke(app, ["train", "-c", str(_job(tmp_path, "./no-such-dir"))])
    assert result.exit_code == 2
    assert f"{tmp_path / 'no-such-dir'} is not a directory" in result.output
    assert hub.requests == []


def test_check_compute_downloads_only_when_asked(hub: FakeHub, tmp_path: Path) -> None:
    from vlmtune.job_checks import check_compute

    job = load_job(_job(tmp_path, REPO, 'revision = "v1.0"\n'))
    assert check_compute(job) == []  # a --dry-run: nothing fetched
    assert hub.requests == []
    assert check_compute(job, download=True) == []
    assert resolve_model_path(REPO, revision="v1.0").name == PINNED_SHA  # now cached
    local = load_job(_job(tmp_path, "tiny-qwen3-vl", 'revision = "v1.0"\n'))
    assert check_compute(local)[0].startswith("job.revision: 'v1.0' pins a Hugging Face hub id")


def test_a_job_trains_the_pinned_revision(hub: FakeHub, tmp_path: Path) -> None:
    from vlmtune.recipes.common import create_training_client

    job = load_job(_job(tmp_path, REPO, 'revision = "v1.0"\n'))
    client = create_training_client(job, tmp_path / "run")
    assert client.engine.config.revision == "v1.0"
    assert client.engine.loaded.path.name == PINNED_SHA
    assert f"/api/models/{REPO}/revision/v1.0" in hub.paths("GET")


def test_every_hosted_name_maps_through_the_one_table() -> None:
    from vlmtune.models.registry import HOSTED_MODEL_NAMES, hub_id

    assert len(HOSTED_MODEL_NAMES) == 6  # 2b, 4b, 8b, 32b, 30b-a3b, 235b-a22b (instruct)
    for hosted, hf_id in HOSTED_MODEL_NAMES.items():
        assert get_model_spec(hosted).name == hf_id == hub_id(hosted)
        assert get_model_spec(hosted.upper()).name == hf_id  # case-insensitive, as ids are
