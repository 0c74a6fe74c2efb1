"""Validation throughput and peak memory, on generated data.

    python benchmarks/validate_throughput.py [--small-rows 10000] [--large-rows 1000]

Generates two JSONL files in a temp dir (small: 64x64 PNGs; large: 1024x1024 JPEGs,
all inline as data URLs), validates each in a fresh subprocess exactly as
``vlmtune data validate`` does (streaming, rows discarded), and prints rows/s
(timed inside the child, import time excluded) and the child's peak RSS from
``os.wait4``'s rusage. Linux carries the parent's RSS high-water mark into a child
across fork+exec, so generation also runs in its own subprocess and this parent
imports nothing heavy: its small footprint is the floor of the figure.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, sys, time
from vlmtune.data import validate_dataset
t0 = time.perf_counter()
report = validate_dataset(sys.argv[1], "sft", max_images_per_message=1)
elapsed = time.perf_counter() - t0
print(json.dumps({"elapsed": elapsed, "total": report.total, "valid": report.valid}))
"""


def _images(kind: str, count: int) -> list[str]:
    """``count`` distinct data URLs (rows cycle through them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        if kind == "png":
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            fmt, mime = "PNG", "image/png"
        else:
            # A smooth gradient plus mild noise: photo-like JPEG sizes (~100-300 KB).
            y, x = np.mgrid[0:1024, 0:1024]
            base = np.stack([x / 4, y / 4, (x + y) / 8], axis=-1)
            noise = rng.normal(0, 12, size=base.shape)
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            fmt, mime = "JPEG", "image/jpeg"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt, quality=90) if fmt == "JPEG" else Image.fromarray(
            pixels
        ).save(buf, fmt)
        out.append(f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}")
    return out


def _write(path: Path, rows: int, urls: list[str]) -> None:
    with path.open("w") as f:
        for i in range(rows):
            row = {
                "messages": [
                    {"role": "system", "content": "You describe images."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                            {"type": "text", "text": f"What is in image {i}?"},
                        ],
                    },
                    {"role": "assistant", "content": "Coloured noise, mostly."},
                ],
                "metadata": {"id": i},
            }
            f.write(json.dumps(row) + "\n")


def _measure(path: Path) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"validation child failed with exit code {proc.returncode}")
    result = json.loads(out)
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def _case(name: str, tmp: Path, rows: int, kind: str, distinct: int) -> None:
    t0 = time.perf_counter()
    path = tmp / f"{kind}.jsonl"
    gen = [sys.executable, __file__, "--generate", kind, str(rows), str(distinct), str(path)]
    subprocess.run(gen, check=True)
    size_mib = path.stat().st_size / 2**20
    gen_s = time.perf_counter() - t0
    r = _measure(path)
    assert r["valid"] == rows, r
    print(
        f"{name:<28} rows={rows:>6,}  file={size_mib:8.1f} MiB  "
        f"validate={r['elapsed']:6.2f} s  {rows / r['elapsed']:8,.0f} rows/s  "
        f"{size_mib / r['elapsed']:7.1f} MiB/s  peak RSS={r['peak_rss_mib']:6.1f} MiB  "
        f"(generated in {gen_s:.1f} s)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small-rows", type=int, default=10_000)
    ap.add_argument("--large-rows", type=int, default=1_000)
    ap.add_argument("--generate", nargs=4, metavar=("KIND", "ROWS", "DISTINCT", "PATH"))
    args = ap.parse_args()
    if args.generate:
        kind, rows, distinct, path = args.generate
        _write(Path(path), int(rows), _images(kind, int(distinct)))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="vlmtune-bench-") as tmp:
        _case("64x64 PNG (data URL)", Path(tmp), args.small_rows, "png", 256)
        _case("1024x1024 JPEG (data URL)", Path(tmp), args.large_rows, "jpeg", 16)


if __name__ == "__main__":
    main()
