"""Load test: N clients training LoRA runs on one `vlmtune serve`, one client sending
invalid requests, and a ``kill -9`` + restart of the server in the middle.

Each valid client submits ``forward_backward`` and ``optim_step`` back to back (as a
training loop does) and ``save_state`` every few steps. Halfway through, the server
process is killed with SIGKILL and started again on the same data dir and port. A
request cut off by the kill is counted apart ("lost to the kill"); the client then
carries on against the restarted server, whose runs rebuild from their newest saved
state. Any other failure of a valid request is an error.

The invalid client sends malformed, out-of-range and unauthorised requests the whole
time; every answer must be a 4xx (a 5xx, a dropped connection or a hang while the
server is up is a failure).

Afterwards it checks that nothing acknowledged was lost: every acknowledged
``save_state`` is listed, each run's step is that of its newest saved state, the
promoted model (made before the kill) still answers chat, the TOML job that was
running at the kill is ``interrupted`` and resumes, and SQLite's integrity check
passes.

    python benchmarks/server_load.py                  # 8 clients x 60 s, own server
    python benchmarks/server_load.py --clients 8 --duration 30
    python benchmarks/server_load.py --no-kill --url http://127.0.0.1:8000 --api-key tml-...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from vlmtune.data.schema import ImagePart, Message, TextPart
from vlmtune.sdk import AdamParams, ServiceClient
from vlmtune.sdk.jobs import JobsClient


def image_part(seed: int) -> ImagePart:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return ImagePart(data=buf.getvalue(), mime="image/png", width=32, height=32)


class Server:
    """`vlmtune serve` in its own process (so client threads do not share its GIL)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        py = sys.executable
        self.key = subprocess.run(
            [py, "-m", "vlmtune", "keys", "create", "--data-dir", str(data_dir)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.up = threading.Event()  # set while the server answers

    def start(self) -> float:
        """Start and wait until healthy; returns the seconds it took."""
        t0 = time.monotonic()
        log = (self.data_dir / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlmtune", "serve", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(1200):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    self.up.set()
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.data_dir / 'server.log'}")
            time.sleep(0.1)
        raise RuntimeError("server did not come up")

    def kill9(self) -> None:
        self.up.clear()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


class Outage:
    """When the server was down: a request that overlaps it was cut off by the kill."""

    def __init__(self) -> None:
        self.killed_at = float("inf")
        self.back_at = float("inf")

    def overlaps(self, submitted_at: float) -> bool:
        return submitted_at < self.back_at and time.monotonic() >= self.killed_at


class Client(threading.Thread):
    def __init__(self, i: int, server: Server, outage: Outage, args: argparse.Namespace) -> None:
        super().__init__(name=f"client-{i}", daemon=True)
        self.i, self.server, self.outage, self.args = i, server, outage, args
        self.tc = ServiceClient(
            base_url=server.url, api_key=server.key
        ).create_lora_training_client(args.base_model, rank=args.lora_rank)
        text = " ".join(["word"] * args.words)
        messages = [
            Message("user", [image_part(i), TextPart(f"describe image {i}: {text}")]),
            Message("assistant", [TextPart(f"it is picture number {i}")]),
        ]
        self.datum = self.tc.datum_from_messages(messages)
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.lost_to_kill = 0
        self.steps = 0  # the run's step as this client knows it
        self.acked_saves: dict[str, int] = {}  # name -> step of every acknowledged save
        self.stop_at = 0.0
        self.pending: list = []  # this step's futures (settled after a kill)

    def step(self) -> None:
        t0 = time.monotonic()
        fb = self.tc.forward_backward([self.datum])
        opt = self.tc.optim_step(AdamParams(learning_rate=1e-3))
        self.pending = [fb, opt]
        fb.result(timeout=300)
        self.latencies.append(time.monotonic() - t0)
        opt.result(timeout=300)
        self.latencies.append(time.monotonic() - t0)
        self.steps += 1
        if self.steps % self.args.save_every == 0:
            name = f"c{self.i}-s{self.steps}"
            save = self.tc.save_state(name)
            self.pending = [save]
            save.result(timeout=300)
            self.acked_saves[name] = self.steps
        self.pending = []

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            submitted = time.monotonic()
            try:
                self.step()
            except Exception as e:  # counted and reported, never hidden
                if not self.outage.overlaps(submitted):
                    self.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                    continue
                self.lost_to_kill += 1
                self.server.up.wait(600)
                for fut in self.pending:  # a queued call may still land on the new server
                    with contextlib.suppress(Exception):
                        fut.result(timeout=300)
                # The restarted server rebuilds the run from its newest saved state.
                self.steps = int(self.tc.get_info()["step"])


def invalid_requests(key: str) -> list[tuple[str, str, dict]]:
    """(method, path, httpx kwargs) of requests a server must refuse with a 4xx."""
    auth = {"Authorization": f"Bearer {key}"}
    huge_id = "x" * 60_000  # near the longest URL a client sends
    huge_body_id = "y" * 5_000_000  # an id in a body has no such limit
    return [
        ("POST", "/api/v1/forward_backward", {"content": b"{not json", "headers": auth}),
        ("POST", "/api/v1/forward_backward", {"json": {"model_id": "nope"}, "headers": auth}),
        (
            "POST",
            "/api/v1/optim_step",
            {"json": {"model_id": "nope", "adam_params": {}}, "headers": auth},
        ),  # noqa: E501
        ("GET", "/api/v1/training_runs", {"params": {"limit": 10**30}, "headers": auth}),
        ("GET", "/api/v1/training_runs", {"params": {"offset": -(10**30)}, "headers": auth}),
        ("GET", "/v1/jobs/job-000000000000/events", {"params": {"after": 2**70}, "headers": auth}),
        ("GET", "/v1/jobs/%ED%A0%80", {"headers": auth}),
        (
            "POST",
            "/api/v1/create_model",
            {
                "content": b'{"base_model":"\\ud800","lora_config":{"rank":8}}',
                "headers": {**auth, "content-type": "application/json"},
            },
        ),  # noqa: E501
        ("GET", f"/v1/jobs/{huge_id}", {"headers": auth}),
        (
            "POST",
            "/api/v1/create_model",
            {
                "json": {"base_model": "tiny-qwen3-vl", "lora_config": {"rank": 10**12}},
                "headers": auth,
            },
        ),  # noqa: E501
        (
            "POST",
            "/v1/jobs/trainer",
            {"json": {"base_model": "tiny-qwen3-vl", "lora_rank": 10**12}, "headers": auth},
        ),  # noqa: E501
        (
            "POST",
            "/v1/jobs",
            {"json": {"config_toml": "[job]\nmodel='tiny-qwen3-vl'\nbogus=1\n"}, "headers": auth},
        ),  # noqa: E501
        (
            "POST",
            "/v1/jobs",
            {
                "json": {"config_toml": "[job]\nmodel='tiny-qwen3-vl'\ndata='/etc/passwd'\n"},
                "headers": auth,
            },
        ),  # noqa: E501
        (
            "POST",
            "/v1/chat/completions",
            {
                "json": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
                "headers": auth,
            },
        ),  # noqa: E501
        (
            "POST",
            "/api/v1/retrieve_future",
            {"json": {"request_id": "no-such-future"}, "headers": auth},
        ),  # noqa: E501
        (
            "POST",
            "/api/v1/retrieve_future",
            {"json": {"request_id": huge_body_id}, "headers": auth},
        ),
        (
            "POST",
            "/api/v1/forward_backward",
            {
                "content": b'{"model_id": NaN}',
                "headers": {**auth, "content-type": "application/json"},
            },
        ),  # noqa: E501
        ("GET", "/api/v1/training_runs", {}),  # no key
        ("GET", "/api/v1/training_runs", {"headers": {"Authorization": "Bearer tml-abcdef_wrong"}}),
    ]


class InvalidClient(threading.Thread):
    """Sends refusable requests round-robin; every answer must be a small 4xx."""

    def __init__(self, server: Server, outage: Outage) -> None:
        super().__init__(name="invalid-client", daemon=True)
        self.server, self.outage = server, outage
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []
        self.lost_to_kill = 0
        self.stop_at = 0.0

    def run(self) -> None:
        requests = invalid_requests(self.server.key)
        with httpx.Client(base_url=self.server.url, timeout=60) as http:
            i = 0
            while time.monotonic() < self.stop_at:
                method, path, kwargs = requests[i % len(requests)]
                i += 1
                submitted = time.monotonic()
                try:
                    r = http.request(method, path, **kwargs)
                except httpx.HTTPError as e:
                    if self.outage.overlaps(submitted):
                        self.lost_to_kill += 1
                        self.server.up.wait(600)
                    else:
                        self.problems.append(f"{method} {path[:60]}: {type(e).__name__}: {e}")
                    continue
                self.statuses[r.status_code] += 1
                if not 400 <= r.status_code < 500:
                    self.problems.append(f"{method} {path[:60]}: {r.status_code} {r.text[:200]}")
                elif len(r.content) > 64_000:
                    self.problems.append(f"{method} {path[:60]}: {len(r.content):,}-byte error")
                time.sleep(0.02)


JOB = """
[algorithm]
variety = "lora"
[job]
model = "tiny-qwen3-vl"
data = "train.jsonl"
name = "{name}"
[hyperparameters]
n_epochs = {epochs}
learning_rate = 5e-3
sequence_length = 128
save_every = 1
[lora]
r = 4
[model]
min_pixels = 4096
max_pixels = 4096
"""


def write_job(folder: Path, name: str, epochs: int) -> Path:
    """A TOML job on a few digits-like rows, written where the server may read it."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w") as f:
        for i in range(4):
            img = base64.b64encode(image_part(100 + i).data).decode()
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
                    {"type": "text", "text": "What digit is this?"}]},
                {"role": "assistant", "content": str(i)}]}) + "\n")  # fmt: skip
    (folder / "job.toml").write_text(JOB.format(name=name, epochs=epochs))
    return folder / "job.toml"


def submit(server: Server, config: Path, poll: bool) -> str:
    """`vlmtune train --server` (the CLI's own submission); returns its last stdout line."""
    out = subprocess.run(
        [sys.executable, "-m", "vlmtune", "train", "--type", "sft", "--config", str(config),
         "--server", server.url, "--api-key", server.key, *(["--poll"] if poll else [])],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


def chat_ok(server: Server, model_id: str) -> bool:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.key}"},
        json={"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=300,
    )
    return r.status_code == 200


def wait_state(jobs: JobsClient, job_id: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (state := jobs.get(job_id)["state"]) not in states:
        if time.monotonic() > deadline:
            return state
        time.sleep(0.2)
    return state


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--no-kill", action="store_true", help="skip the kill -9 + restart")
    p.add_argument("--base-model", default="tiny-qwen3-vl")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--save-every", type=int, default=3, help="save_state every N steps")
    p.add_argument("--words", type=int, default=24, help="prompt length knob")
    args = p.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="vlmtune-load-"))
    server = Server(data_dir)
    print(f"server up in {server.start():.1f} s: {server.url} (data {data_dir})")
    inputs = Path(tempfile.mkdtemp(prefix="vlmtune-load-inputs-"))  # `train --server` uploads
    outage = Outage()
    saves_at_kill = 0
    jobs = JobsClient(server.url, server.key)
    try:
        promoted = submit(server, write_job(inputs / "short", "short", 1), poll=True)
        print(f"before the load: TOML job trained and promoted {promoted!r}")
        long_job = submit(server, write_job(inputs / "long", "long", 10_000), poll=False)
        wait_state(jobs, long_job, {"running"})

        t0 = time.monotonic()
        clients = [Client(i, server, outage, args) for i in range(args.clients)]
        print(f"{len(clients)} LoRA runs created in {time.monotonic() - t0:.1f} s")
        for c in clients:  # warm-up step, outside the measurement
            c.step()
        invalid = InvalidClient(server, outage)
        start = time.monotonic()
        for t in [*clients, invalid]:
            t.stop_at = start + args.duration
            t.start()
        if not args.no_kill:
            time.sleep(args.duration / 2)
            outage.killed_at = time.monotonic()
            server.kill9()
            print(f"kill -9 at t={outage.killed_at - start:.1f} s "
                  f"(long job {long_job} running, {sum(len(c.acked_saves) for c in clients)} "
                  "saves acknowledged so far)")  # fmt: skip
            saves_at_kill = sum(len(c.acked_saves) for c in clients)
            took = server.start()
            outage.back_at = time.monotonic()
            print(f"restarted in {took:.1f} s")
        for t in [*clients, invalid]:
            t.join()
        elapsed = time.monotonic() - start

        lat = np.array([x for c in clients for x in c.latencies]) * 1000
        errors = [e for c in clients for e in c.errors]
        requests = len(lat) + len(errors)
        lost = sum(c.lost_to_kill for c in clients)
        print(f"clients {len(clients)}  duration {elapsed:.1f} s  valid requests {requests}")
        print(
            f"throughput {requests / elapsed:.2f} requests/s ({requests / 2 / elapsed:.2f} steps/s)"
        )
        if len(lat):
            p50, p99 = np.percentile(lat, [50, 99])
            print(f"latency p50 {p50:.0f} ms  p99 {p99:.0f} ms  max {lat.max():.0f} ms")
        print(f"errors on valid requests {len(errors)}  (steps cut off by the kill: {lost})")
        for e in errors[:5]:
            print("  ", e)
        codes = " ".join(f"{k}x{v}" for k, v in sorted(invalid.statuses.items()))
        n_5xx = sum(v for k, v in invalid.statuses.items() if k >= 500)
        print(f"invalid client: {sum(invalid.statuses.values())} requests, statuses {codes}, "
              f"5xx {n_5xx}, problems {len(invalid.problems)}")  # fmt: skip
        for e in invalid.problems[:5]:
            print("  ", e)

        bad = []
        for c in clients:
            info = c.tc.get_info()
            if info["step"] != c.steps:
                bad.append(f"run {c.tc.model_id}: step {info['step']}, client has {c.steps}")
            listed = {ck["tinker_path"].rsplit("/", 1)[-1] for ck in c.tc.list_checkpoints()}
            missing = set(c.acked_saves) - listed
            if missing:
                bad.append(f"run {c.tc.model_id}: acknowledged saves missing: {sorted(missing)}")
        n_acked = sum(len(c.acked_saves) for c in clients)
        if not args.no_kill:
            steps = sum(c.steps for c in clients)
            print(f"after the restart: {n_acked - saves_at_kill} more saves acknowledged; "
                  f"runs at {steps} steps in all")  # fmt: skip
        if not chat_ok(server, promoted):
            bad.append(f"promoted model {promoted} does not answer chat")
        state = jobs.get(long_job)["state"]
        if not args.no_kill:
            if state != "interrupted":
                bad.append(f"long job {long_job}: state {state!r} after the restart")
            else:
                jobs.resume(long_job)
                resumed = wait_state(jobs, long_job, {"running"})
                if resumed != "running":
                    bad.append(f"long job {long_job} did not resume: {resumed}")
                state = f"interrupted -> resumed ({resumed})"
        jobs.cancel(long_job)
        db = sqlite3.connect(f"file:{data_dir / 'server.db'}?mode=ro", uri=True)
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        db.close()
        if integrity != "ok":
            bad.append(f"server.db integrity_check: {integrity}")
        print(f"state: {n_acked} acknowledged saves all listed; every run's step matches; "
              f"promoted model answers; long job {state}; server.db integrity {integrity}"
              if not bad else "state check FAILED: " + "; ".join(bad))  # fmt: skip
        ok = not errors and not bad and n_5xx == 0 and not invalid.problems
        print("RESULT: " + ("ok" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
