"""Preference (DPO) and RL prompt JSONL from the digits SFT files of make_data.py.

For every row of ``train.jsonl`` / ``test.jsonl`` (same split, same images):

- ``{split}_pref.jsonl``: ``chosen`` = the image question answered with the right digit,
  ``rejected`` = the same prompt answered with a wrong digit (seeded). The train split
  gets ``--negatives N`` pairs per image, each with a different wrong digit (default 9:
  every wrong digit); the test split one pair per image;
- ``{split}_rl.jsonl``: the prompt alone (ending with the user turn), the digit in
  ``metadata.answer`` for the ``exact_match`` reward.

    python examples/digits/make_pref_data.py [--data examples/digits/data]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = ("train", "test")  # read as {split}.jsonl (make_data.py) from --data
KINDS = ("pref", "rl")  # written as {split}_{kind}.jsonl next to them
DEFAULT_DATA = Path(__file__).parent / "data"


def preference_rows(row: dict, rng: random.Random, negatives: int) -> list[dict]:
    prompt, answer = row["messages"][:-1], row["metadata"]["answer"]
    wrong = rng.sample([str(d) for d in range(10) if str(d) != answer], negatives)
    return [
        {
            "chosen": {"messages": [*prompt, {"role": "assistant", "content": answer}]},
            "rejected": {"messages": [*prompt, {"role": "assistant", "content": w}]},
            "metadata": {**row["metadata"], "rejected": w},
        }
        for w in wrong
    ]


def rl_row(row: dict) -> dict:
    return {"messages": row["messages"][:-1], "metadata": row["metadata"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--negatives", type=int, default=9, help="train pairs per image: wrong digits (1-9)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    for split in SPLITS:
        rows = [json.loads(x) for x in (args.data / f"{split}.jsonl").read_text().splitlines()]
        negatives = args.negatives if split == "train" else 1
        pref = [p for r in rows for p in preference_rows(r, rng, negatives)]
        for name, out in zip(KINDS, (pref, [rl_row(r) for r in rows]), strict=True):
            path = args.data / f"{split}_{name}.jsonl"
            path.write_text("".join(json.dumps(x) + "\n" for x in out))
            print(f"wrote {len(out)} rows to {path}")


if __name__ == "__main__":
    main()
