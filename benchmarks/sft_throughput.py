"""SFT throughput on the digits data with the tiny model: examples/s, tokens/s, peak RSS.

Each configuration runs in its own subprocess, so peak RSS is that run's alone:

    .venv/bin/python benchmarks/sft_throughput.py [--examples 400] [--configs all]

On a GPU machine, ``--model-config qwen3-vl-2b`` builds a Qwen3-VL-2B-sized model from
its config with random weights (bf16) instead of the tiny one.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "digits" / "data" / "train.jsonl"

CONFIGS = {
    # name: (mode, packing, freeze_embeddings)
    "full-packed-frozen-emb": ("full", True, True),
    "full-packed": ("full", True, False),
    "full-unpacked-frozen-emb": ("full", False, True),
    "lora-packed": ("lora", True, False),
}


def run_one(name: str, examples: int, batch: int, model: str) -> dict:
    """One configuration in this process: warm up one step, then time the rest."""
    import torch

    from vlmtune.data import load_dataset
    from vlmtune.render import build_sft_datums
    from vlmtune.sdk import AdamParams, ServiceClient, scale_weights, weighted_token_count

    torch.manual_seed(0)
    mode, packing, freeze_emb = CONFIGS[name]
    rows, _ = load_dataset(DATA, "sft")
    rows = rows[:examples]
    tc = ServiceClient().create_training_client(
        model,
        lora_rank=0 if mode == "full" else 16,
        mode=mode,
        freeze_vision_tower=False,
        freeze_projector=False,
        freeze_embeddings=freeze_emb,
        min_pixels=4096,
        max_pixels=4096,
        packing=packing,
        max_row_tokens=256,
    )
    datums, _ = build_sft_datums(rows, tc.renderer, sequence_length=256, train_on="all_assistant")
    steps = [datums[i : i + batch] for i in range(0, len(datums), batch)]
    adam = AdamParams(learning_rate=1e-4)

    def step(b: list) -> None:
        tc.forward_backward(scale_weights(b, 1.0 / weighted_token_count(b))).result()
        tc.optim_step(adam).result()

    step(steps[0])  # warm-up: allocator, optimizer state, image cache
    t0 = time.perf_counter()
    for b in steps[1:]:
        step(b)
    elapsed = time.perf_counter() - t0
    n = sum(len(b) for b in steps[1:])
    tokens = sum(d.model_input.length for b in steps[1:] for d in b)
    return {
        "config": name,
        "examples": n,
        "examples_per_s": n / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--configs", default="all", help="comma-separated names, or all")
    parser.add_argument("--model", default="tiny-qwen3-vl")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        print(json.dumps(run_one(args._child, args.examples, args.batch, args.model)))
        return
    if not DATA.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "digits" / "make_data.py")], check=True
        )
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    results = []
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            name,
            "--examples",
            str(args.examples),
            "--batch",
            str(args.batch),
            "--model",
            args.model,
        ]
        out = subprocess.run(
            cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{r['config']:26s} {r['examples_per_s']:8.1f} ex/s {r['tokens_per_s']:9.0f} tok/s "
            f"peak RSS {r['peak_rss_mib']:7.0f} MiB",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
