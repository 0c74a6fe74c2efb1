"""DPO and RL on the digits, each from a short SFT run, with held-out accuracy around each.

    short SFT -> eval -> DPO -> eval
              \\-> RL  -> eval

Runs the same commands a user would type (``vlmtune train`` / ``vlmtune eval``) on the
CPU with the built-in tiny Qwen3-VL. The short SFT (``--sft-steps``, default 50 of the
540 steps sft.toml would run) reads some digits, leaving room for DPO and RL.

    python examples/digits/run_dpo_rl.py [--sft-steps 50] [--only dpo|rl] [--reuse-sft]
"""

from __future__ import annotations

import argparse
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
RUNS = ROOT / "runs"
PIXELS = ["--min-pixels", "4096", "--max-pixels", "4096"]
# One torch thread, as run_demo.py: the tiny model's matrices are too small to split, and
# on a busy 2-core machine a second thread spins waiting for a core.
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def sh(cmd: list[str]) -> str:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    return out.stdout


def accuracy(model: Path) -> float:
    test = HERE / "data" / "test.jsonl"
    out = sh([*VLMTUNE, "eval", "--model", str(model), "--data", str(test), "--json", *PIXELS,
              "--max-new-tokens", "4"])  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["accuracy"]


def train(kind: str, config: Path, run_dir: Path, *overrides: str) -> float:
    """Run ``vlmtune train`` into a fresh run_dir; returns its wall time in seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    sh([*VLMTUNE, "train", "--type", kind, "--config", str(config), "--output", str(run_dir),
        *overrides])  # fmt: skip
    return time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft-steps", type=int, default=50)
    parser.add_argument("--only", choices=["dpo", "rl"], default=None)
    parser.add_argument("--reuse-sft", action="store_true", help="keep runs/digits-sft-short")
    args = parser.parse_args()

    if not (HERE / "data" / "test.jsonl").exists():
        sh([sys.executable, str(HERE / "make_data.py")])
    sh([sys.executable, str(HERE / "make_pref_data.py")])

    sft_dir = RUNS / "digits-sft-short"
    timings: dict[str, float] = {}
    if not (args.reuse_sft and (sft_dir / "final").is_dir()):
        timings["sft"] = train(
            "sft",
            HERE / "sft.toml",
            sft_dir,
            f"hyperparameters.max_steps={args.sft_steps}",
            "hyperparameters.save_every=0",
        )
    start = accuracy(sft_dir / "final")
    model = f"job.model={sft_dir / 'final'}"
    results: dict[str, float] = {}
    for kind in ("dpo", "rl"):
        if args.only in (None, kind):
            run_dir = RUNS / f"digits-{kind}"
            timings[kind] = train(kind, HERE / f"{kind}.toml", run_dir, model)
            results[kind] = accuracy(run_dir / "final")

    def minutes(kind: str) -> str:
        return f"({timings[kind] / 60:.1f} min)" if kind in timings else ""

    print()
    print("=" * 64)
    print("  held-out digits accuracy (n=360, chance 10%)")
    label = f"short SFT, {args.sft_steps} steps"
    print(f"    {label:22s}{start:6.1%}  {'':8s}  {minutes('sft')}")
    for kind, acc in results.items():
        gain = f"({(acc - start) * 100:+.1f})"
        print(f"    {'+ ' + kind.upper():22s}{acc:6.1%}  {gain:8s}  {minutes(kind)}")
    print(f"  runs: {RUNS}")
    print("=" * 64)


if __name__ == "__main__":
    main()
