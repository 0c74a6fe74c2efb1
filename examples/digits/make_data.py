"""Turn scikit-learn's 1,797 real handwritten digits into chat JSONL.

Each row is one user turn (the digit as a PNG data URL + a question) and one
assistant turn (the digit). The 8x8 scans are upscaled 4x with nearest-neighbour so
every original pixel survives the processor's resize; a seeded, stratified split
holds out 20% for evaluation.

    python examples/digits/make_data.py [--out examples/digits/data]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

QUESTION = "What digit is this?"
SPLITS = ("train", "test")  # written as {split}.jsonl in --out
DEFAULT_OUT = Path(__file__).parent / "data"


def digit_png_data_url(pixels_8x8: np.ndarray, scale: int = 4) -> str:
    gray = (pixels_8x8 * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = (
        Image.fromarray(gray, mode="L").resize((8 * scale, 8 * scale), Image.NEAREST).convert("RGB")
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def row(pixels_8x8: np.ndarray, label: int, index: int) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": digit_png_data_url(pixels_8x8)}},
                    {"type": "text", "text": QUESTION},
                ],
            },
            {"role": "assistant", "content": str(label)},
        ],
        "metadata": {"answer": str(label), "index": index},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=args.test_size, random_state=args.seed, stratify=digits.target
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for name, idx in zip(SPLITS, (train_idx, test_idx), strict=True):
        path = args.out / f"{name}.jsonl"
        with path.open("w") as f:
            for i in sorted(idx):
                f.write(json.dumps(row(digits.images[i], int(digits.target[i]), int(i))) + "\n")
        print(f"wrote {len(idx)} rows to {path}")


if __name__ == "__main__":
    main()
