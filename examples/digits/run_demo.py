"""`make demo`: digits data -> eval the base model -> `vlmtune train` -> eval again.

Runs the same commands a user would type, and prints held-out accuracy before and
after fine-tuning. Everything runs on the CPU with the built-in tiny Qwen3-VL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VLMTUNE = [sys.executable, "-m", "vlmtune"]
RUN_DIR = ROOT / "runs" / "digits-sft"
PIXELS = ["--min-pixels", "4096", "--max-pixels", "4096"]


# One torch thread: the tiny model's matrices are too small to split, and on a busy
# 2-core machine a second thread spins waiting for a core (measured: steps up to 30x slower).
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def sh(cmd: list[str]) -> str:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    return out.stdout


def accuracy(model: str) -> dict:
    test = HERE / "data" / "test.jsonl"
    out = sh(
        [
            *VLMTUNE,
            "eval",
            "--model",
            model,
            "--data",
            str(test),
            "--max-new-tokens",
            "4",
            "--json",
            *PIXELS,
        ]
    )
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    t0 = time.time()
    sh([sys.executable, str(HERE / "make_data.py")])
    before = accuracy("tiny-qwen3-vl")
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    sh(
        [
            *VLMTUNE,
            "train",
            "--type",
            "sft",
            "--config",
            str(HERE / "sft.toml"),
            "--output",
            str(RUN_DIR),
        ]
    )
    after = accuracy(str(RUN_DIR / "final"))
    minutes = (time.time() - t0) / 60
    print()
    print("=" * 60)
    print(f"  held-out digits accuracy (n={after['n']}, chance 10%)")
    print(f"    before fine-tuning: {before['accuracy']:6.1%}")
    print(f"    after  fine-tuning: {after['accuracy']:6.1%}")
    print(f"  total time: {minutes:.1f} min   run: {RUN_DIR}")
    print("=" * 60)


if __name__ == "__main__":
    main()
