"""`make agent-demo`: collect -> filter -> fine-tune -> serve -> collect again.

An agent improving from its own experience, with the same commands a user types:

1. `vlmtune collect` runs a random policy on the built-in `lamp` task (press the button
   of the lamp's colour; random succeeds about 1 time in 4) and stores every step;
2. `vlmtune filter` keeps the successful episodes as SFT rows (the exact prompts plus
   the answers that worked);
3. `vlmtune train` fine-tunes the built-in tiny Qwen3-VL on them;
4. `vlmtune serve` serves the fine-tuned model, and `vlmtune collect` plays held-out
   episodes with it over the OpenAI-compatible chat endpoint.

Prints the success rate before (random play) and after (the fine-tuned model).
Everything runs on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VLMTUNE = [sys.executable, "-m", "vlmtune"]
RUN = ROOT / "runs" / "agent"
STORE = RUN / "traces.db"
# 1,200 random episodes leave ~290 successes: enough for the tiny model to learn the
# colours (>90% held out) in four epochs, about a minute of training on the CPU.
EPISODES = 1200
EVAL_EPISODES = 200

# One torch thread: the tiny model's matrices are too small to split (see examples/digits).
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def sh(cmd: list[str]) -> str:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    return out.stdout


def collect(*args: str) -> dict:
    out = sh([*VLMTUNE, "collect", "--task", "lamp", "--store", str(STORE), "--json", *args])
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vlmtune serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"vlmtune serve did not answer at {url} within {timeout_s:.0f} s")


def main() -> None:
    t0 = time.time()
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)

    before = collect("--policy", "random", "--episodes", str(EPISODES), "--concurrency", "4")
    sh([*VLMTUNE, "filter", "--store", str(STORE), "--to", "sft", "--success-only",
        "--policy", "random", "--output", str(RUN / "sft.jsonl"),
        "--validation-output", str(RUN / "val.jsonl"), "--validation-fraction", "0.1"])  # fmt: skip
    sh([*VLMTUNE, "train", "--type", "sft", "--config", str(HERE / "sft.toml"),
        "--output", str(RUN / "sft-run")])  # fmt: skip

    data_dir = RUN / "server"
    key = sh([*VLMTUNE, "keys", "create", "--data-dir", str(data_dir), "--label", "agent-demo"])
    key = key.strip().splitlines()[-1].strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [*VLMTUNE, "serve", "--data-dir", str(data_dir), "--port", str(port),
             "--model-alias", f"lamp-agent={RUN / 'sft-run' / 'final'}"]  # fmt: skip
    print("$ " + " ".join(serve), flush=True)
    log = open(RUN / "serve.log", "w")  # noqa: SIM115 (closed after the server stops)
    server = subprocess.Popen(serve, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        # Held-out seeds (the test split), greedy answers: what the agent has learned.
        after = collect("--policy", f"openai:{url}", "--model", "lamp-agent",
                        "--api-key", key, "--split", "test", "--temperature", "0",
                        "--max-tokens", "4", "--episodes", str(EVAL_EPISODES),
                        "--concurrency", "4")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    minutes = (time.time() - t0) / 60
    print()
    print("=" * 64)
    print("  lamp task: press the button of the lamp's colour (4 buttons)")
    print(f"    before: random policy      {before['success_rate']:6.1%}  "
          f"(n={before['episodes']}, {before['frames_per_s']:.0f} frames/s)")  # fmt: skip
    print(f"    after:  fine-tuned model   {after['success_rate']:6.1%}  "
          f"(n={after['episodes']} held out, {after['frames_per_s']:.1f} frames/s over HTTP, "
          f"{after['valid_action_share']:.0%} valid actions)")  # fmt: skip
    print(f"  total time: {minutes:.1f} min   traces: {STORE}")
    print("=" * 64)
    if after["success_rate"] < 0.9:
        raise SystemExit("the fine-tuned agent succeeded in fewer than 90% of episodes")


if __name__ == "__main__":
    main()
