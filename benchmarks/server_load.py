"""Load test: N clients, each training its own LoRA run on one `vlmtune serve`.

Each client submits ``forward_backward`` and ``optim_step`` back to back (as a training
loop does), waits for both, and repeats for the duration. Prints requests/s,
p50/p99 latency (submission to result, per request), errors (must be zero), and
checks every run's state afterwards: its step count must equal the optim_steps its
client completed.

    python benchmarks/server_load.py                  # 8 clients x 60 s, own server
    python benchmarks/server_load.py --clients 8 --duration 20
    python benchmarks/server_load.py --url http://127.0.0.1:8000 --api-key tml-...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from vlmtune.data.schema import ImagePart, Message, TextPart
from vlmtune.sdk import AdamParams, ServiceClient


def image_part(seed: int) -> ImagePart:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return ImagePart(data=buf.getvalue(), mime="image/png", width=32, height=32)


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str, str]:
    """`vlmtune serve` in its own process (so client threads do not share its GIL)."""
    py = sys.executable
    key = subprocess.run(
        [py, "-m", "vlmtune", "keys", "create", "--data-dir", str(data_dir)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (data_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [py, "-m", "vlmtune", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {data_dir / 'server.log'}")
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


class Client(threading.Thread):
    def __init__(self, i: int, url: str, key: str, args: argparse.Namespace) -> None:
        super().__init__(name=f"client-{i}", daemon=True)
        self.i, self.args = i, args
        self.tc = ServiceClient(base_url=url, api_key=key).create_lora_training_client(
            args.base_model, rank=args.lora_rank
        )
        text = " ".join(["word"] * args.words)
        messages = [
            Message("user", [image_part(i), TextPart(f"describe image {i}: {text}")]),
            Message("assistant", [TextPart(f"it is picture number {i}")]),
        ]
        self.datum = self.tc.datum_from_messages(messages)
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.steps = 0
        self.start_at = self.stop_at = 0.0

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            t0 = time.monotonic()
            fb = self.tc.forward_backward([self.datum])
            opt = self.tc.optim_step(AdamParams(learning_rate=1e-3))
            for fut in (fb, opt):
                try:
                    fut.result(timeout=300)
                    self.latencies.append(time.monotonic() - t0)
                    self.steps += fut is opt  # optim_steps that completed
                except Exception as e:  # counted and reported, never hidden
                    self.errors.append(f"{type(e).__name__}: {e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--url", help="an existing server (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("VLMTUNE_API_KEY"))
    p.add_argument("--base-model", default="tiny-qwen3-vl")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--words", type=int, default=24, help="prompt length knob")
    args = p.parse_args()

    proc = None
    if args.url is None:
        data_dir = Path(tempfile.mkdtemp(prefix="vlmtune-load-"))
        proc, url, key = start_server(data_dir)
        print(f"server {url} (data {data_dir})")
    else:
        url, key = args.url, args.api_key
    try:
        t0 = time.monotonic()
        clients = [Client(i, url, key, args) for i in range(args.clients)]
        print(f"{len(clients)} LoRA runs created in {time.monotonic() - t0:.1f} s")
        for c in clients:  # warm-up step, outside the measurement
            c.tc.forward_backward([c.datum]).result()
            c.tc.optim_step(AdamParams(learning_rate=1e-3)).result()
            c.steps = 1
        start = time.monotonic()
        for c in clients:
            c.stop_at = start + args.duration
            c.start()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - start
        lat = np.array([x for c in clients for x in c.latencies]) * 1000
        errors = [e for c in clients for e in c.errors]
        requests = len(lat) + len(errors)
        print(f"clients {len(clients)}  duration {elapsed:.1f} s  requests {requests}")
        print(
            f"throughput {requests / elapsed:.2f} requests/s ({requests / 2 / elapsed:.2f} steps/s)"
        )
        if len(lat):
            p50, p99 = np.percentile(lat, [50, 99])
            print(f"latency p50 {p50:.0f} ms  p99 {p99:.0f} ms  max {lat.max():.0f} ms")
        print(f"errors {len(errors)}")
        for e in errors[:5]:
            print("  ", e)
        bad = []
        for c in clients:
            step = c.tc.get_info()["step"]
            if step != c.steps:
                bad.append(f"run {c.tc.model_id}: step {step}, client completed {c.steps}")
        print("state check: " + ("all runs' step counts match" if not bad else "; ".join(bad)))
        return 0 if not errors and not bad else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
