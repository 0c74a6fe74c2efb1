"""Packing efficiency of ``pack_rows`` on the digits set and on a long-tail length mix.

    .venv/bin/python benchmarks/packing_efficiency.py [--seq 256,512,1024,2048,4096]

For each data set and sequence length (= a packed row's capacity) it prints:

  whole set  real tokens / (rows x capacity) when the whole set is packed at once
             (first-fit decreasing): the best any batching of these examples can do;
  per step   the same, packing each optimizer step's examples (``--batch``), as the
             engine does (``packing_efficiency`` in metrics.jsonl);
  tensor     real tokens / (rows x longest row) of each step's packed tensor: the share
             of the compute that is not padding (a step's last row is short, but the
             tensor is only as long as its longest row);
  padded     real tokens / (batch x longest example), one example per row padded to the
             batch's longest: what padding-based batching computes (TRL on VLM data);
  dropped    examples longer than the row, dropped (vlmtune never truncates them).

Digits lengths come from rendering the real rows with the tiny model's tokenizer;
the long tail is lognormal (median ``--median`` tokens, sigma ``--sigma``).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from vlmtune.engine.batching import pack_rows, packing_efficiency

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "digits" / "data" / "train.jsonl"


def digits_lengths() -> list[int]:
    """Rendered Datum lengths of the digits training rows (images at 4,096 pixels)."""
    from vlmtune.data import load_dataset
    from vlmtune.models.loading import load_processor
    from vlmtune.models.tiny import tiny_model_dir
    from vlmtune.models.vision import ImagePreprocessor
    from vlmtune.render import Renderer
    from vlmtune.render_rows import build_sft_datums

    processor = load_processor(tiny_model_dir(), 4096, 4096)
    renderer = Renderer.from_processor(processor, ImagePreprocessor.from_processor(processor))
    rows, _ = load_dataset(DATA, "sft")
    datums, _ = build_sft_datums(rows, renderer, sequence_length=1 << 20)
    return [d.model_input.length for d in datums]


def lognormal_lengths(n: int, median: float, sigma: float, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(8, round(rng.lognormvariate(math.log(median), sigma))) for _ in range(n)]


def measure(lengths: list[int], capacity: int, batch: int) -> dict[str, float]:
    kept = [n for n in lengths if n <= capacity]
    whole = packing_efficiency(kept, pack_rows(kept, capacity), capacity)
    per_step_real = per_step_capacity = tensor_cells = padded_cells = 0
    for start in range(0, len(kept), batch):
        step = kept[start : start + batch]
        rows = pack_rows(step, capacity)
        row_lengths = [sum(step[i] for i in row) for row in rows]
        per_step_real += sum(step)
        per_step_capacity += len(rows) * capacity
        tensor_cells += len(rows) * max(row_lengths)
        padded_cells += len(step) * max(step)
    return {
        "whole": whole,
        "per_step": per_step_real / per_step_capacity,
        "tensor": per_step_real / tensor_cells,
        "padded": per_step_real / padded_cells,
        "dropped": len(lengths) - len(kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", default="256,512,1024,2048,4096", help="row capacities")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--n", type=int, default=5000, help="long-tail examples")
    parser.add_argument("--median", type=float, default=300.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args()

    sets = {
        "digits": digits_lengths(),
        f"lognormal(med {args.median:.0f}, s {args.sigma})": lognormal_lengths(
            args.n, args.median, args.sigma
        ),
    }
    for name, lengths in sets.items():
        mean = sum(lengths) / len(lengths)
        print(f"\n{name}: {len(lengths)} examples, mean {mean:.0f} tokens, max {max(lengths)}")
        print(
            f"{'seq':>6s} {'whole set':>9s} {'per step':>9s} {'tensor':>7s} {'padded':>7s} "
            f"{'dropped':>8s}   (step = {args.batch} examples)"
        )
        for capacity in (int(s) for s in args.seq.split(",")):
            m = measure(lengths, capacity, args.batch)
            print(
                f"{capacity:6d} {m['whole']:9.3f} {m['per_step']:9.3f} {m['tensor']:7.3f} "
                f"{m['padded']:7.3f} {m['dropped']:8d}"
            )


if __name__ == "__main__":
    main()
