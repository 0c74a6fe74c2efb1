"""Packed rows against one example per micro-batch, on examples of varied length.

    .venv/bin/python benchmarks/packed_vs_unpacked.py [--examples 96] [--seq-len 2048]
        [--repeat 2] [--profile]
    .venv/bin/python benchmarks/packed_vs_unpacked.py --device cuda --seq-len 16384

The data is built here, seeded: a user turn of one image and a prompt of 10-300 words,
an assistant answer of 1-40 words (the loss is on the answer). Images are noise PNGs of
128-896 px a side (16-784 image tokens), so examples run from ~50 to ~1,300 tokens at
``--seq-len 2048``; with a longer ``--seq-len`` the word counts scale with it
(``--length-scale``, default ``seq_len / 2048``), so that rows still hold a few
examples each. Examples longer than a row are dropped, as training drops them.

The job: ``tiny-qwen3-vl``, full fine-tuning with the vision tower and projector
trained and the tied embedding frozen (as ``sft_throughput.py``'s matched
configuration), AdamW, effective batch ``--batch``. ``packed`` packs each step's
examples into rows of ``--seq-len`` tokens; ``unpacked`` runs one example per
micro-batch (the engine's default without packing: no padding at all); ``padded``
(ask for it with ``--configs packed,unpacked,padded``) runs ``--padded-batch`` examples
per micro-batch, right-padded to the longest, as padded batching does elsewhere. Each
configuration runs in its own process, the two interleaved ``--repeat`` times; step 1 is
warm-up and not timed. Peak memory: the process's peak RSS, also above its RSS after
``import torch``+vlmtune (what the run itself adds); on CUDA also
``torch.cuda.max_memory_allocated``. The first steps' losses of both configurations
are printed: they must agree (packing changes no example's result).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("packed", "unpacked")  # the default comparison; "padded" on request
_WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which "
    "this be or had not but one all they their has been have we more who its also new "
    "two first time after may other some would only used into can over three when most "
    "such city during state world year between through under where later while before "
    "school found known called part four high then both each river small early well "
    "name family since until house people water group place game music film light "
    "image picture colour shape left right above below number letter green blue red "
    "yellow black white round square large corner centre edge line point pattern"
)
WORDS = _WORDS.split()


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def noise_png(width: int, height: int, rng: random.Random) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.randrange(2**32))
    # Low-resolution noise scaled up: realistic PNG sizes, cheap to decode.
    small = gen.integers(0, 255, size=(max(1, height // 16), max(1, width // 16), 3))
    img = Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def varied_conversations(
    n: int, seed: int, length_scale: float, image_px: tuple[int, int] = (128, 896)
) -> list:
    """``n`` one-image conversations: prompts of 10-300 words, answers of 1-40, images
    of ``image_px`` (min, max) pixels a side, in steps of 32 (one merged token)."""
    from vlmtune.data.schema import ImagePart, Message, TextPart

    rng = random.Random(seed)
    convs = []
    lo, hi = image_px
    for _ in range(n):
        w, h = rng.randrange(lo, hi + 1, 32), rng.randrange(lo, hi + 1, 32)
        prompt_words = round(rng.randint(10, 300) * length_scale)
        answer_words = max(1, round(rng.randint(1, 40) * length_scale))
        image = ImagePart(data=noise_png(w, h, rng), mime="image/png", width=w, height=h)
        prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        answer = " ".join(rng.choice(WORDS) for _ in range(answer_words))
        convs.append(
            [
                Message(role="user", parts=[image, TextPart(prompt)]),
                Message(role="assistant", parts=[TextPart(answer)]),
            ]
        )
    return convs


def run_config(name: str, args: argparse.Namespace) -> dict:
    """One configuration, in this (child) process."""
    import torch

    torch.set_num_threads(args.threads)
    from vlmtune.engine.engine import EngineConfig, TrainingEngine
    from vlmtune.engine.prefetch import prefetch_images
    from vlmtune.models.tiny import tiny_model_dir
    from vlmtune.render import datum_from_rendered
    from vlmtune.sdk import scale_weights, weighted_token_count
    from vlmtune.types import AdamParams

    baseline_mib = rss_mib()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    engine = TrainingEngine(
        EngineConfig(
            base_model=str(tiny_model_dir()),
            mode="full",
            freeze_vision_tower=False,
            freeze_projector=False,
            freeze_embeddings=True,
            min_pixels=args.image_px[0] ** 2,
            max_pixels=args.image_px[1] ** 2,
            precision="auto" if cuda else "fp32",
            device="cuda" if cuda else "cpu",
            packing=name == "packed",
            max_row_tokens=args.seq_len,
            # "padded": several examples per micro-batch, padded to the longest of them
            micro_batch_size=args.padded_batch if name == "padded" else 1,
        )
    )
    scale = args.length_scale or args.seq_len / 2048
    convs = varied_conversations(args.examples, args.seed, scale, args.image_px)
    datums = [datum_from_rendered(engine.renderer.render(c), engine.image_token_id) for c in convs]
    datums = [d for d in datums if d.model_input.length <= args.seq_len]
    prefetch_images(datums, engine.image_preprocessor)
    steps = [datums[i : i + args.batch] for i in range(0, len(datums), args.batch)]
    profile = None
    losses = []
    elapsed = cpu = 0.0
    for s, batch in enumerate(steps):
        if s == 1 and args.profile:  # step 0 is warm-up: allocator, optimizer state
            from vlmtune.engine.step_profile import StepProfile

            profile = engine.profile = StepProfile(engine.device)
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = engine.forward_backward(scale_weights(batch, 1.0 / weighted_token_count(batch)))
        engine.optim_step(AdamParams(learning_rate=1e-4, grad_clip_norm=1.0))
        if cuda:
            torch.cuda.synchronize()
        if s > 0:
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
        losses.append(out.metrics["loss:sum"])
    timed = [d for b in steps[1:] for d in b]
    lengths = [d.model_input.length for d in datums]
    result = {
        "config": name,
        "examples": len(timed),
        "dropped": args.examples - len(datums),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
        "examples_per_s": len(timed) / elapsed,
        # Per second of this process's own CPU time: steadier than wall time on a
        # machine that other work shares (one torch thread: CPU time ~ work done).
        "examples_per_cpu_s": len(timed) / cpu,
        "tokens_per_s": sum(d.model_input.length for d in timed) / elapsed,
        "baseline_rss_mib": baseline_mib,
        "peak_rss_mib": rss_mib("VmHWM"),
        "losses": losses[:4],
        "profile": dict(profile.seconds) if profile else None,
        # forward passes over the timed steps: rows (packed) or micro-batches
        "micro_batches": profile.calls["forward"] if profile else None,
        "timed_steps": len(steps) - 1,
        "timed_s": elapsed,
    }
    if cuda:
        result["device"] = torch.cuda.get_device_name()
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child(name: str, args: argparse.Namespace, src: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_child", name, *args.forward]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if src:  # another checkout's src/ (e.g. the last commit's, for before/after)
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-6000:])
        raise SystemExit(f"{name} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rep: int, r: dict) -> None:
    gpu = f"  GPU peak {r['peak_allocated_mib']:6.0f} MiB" if "device" in r else ""
    added = r["peak_rss_mib"] - r["baseline_rss_mib"]
    print(
        f"[{rep}] {r['config']:14s} {r['examples_per_s']:6.2f} ex/s "
        f"{r['examples_per_cpu_s']:6.2f} ex/CPU-s {r['tokens_per_s']:6.0f} tok/s  peak RSS "
        f"{r['peak_rss_mib']:5.0f} MiB (+{added:4.0f} over import){gpu}  "
        f"load {os.getloadavg()[0]:.1f}  losses " + " ".join(f"{x:.4f}" for x in r["losses"]),
        flush=True,
    )
    if r["profile"]:
        print(
            f"      {r['micro_batches']} micro-batches  "
            + "  ".join(f"{k} {v:.2f}s" for k, v in r["profile"].items())
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--seq-len", "--seq", type=int, default=2048, help="packed row capacity")
    p.add_argument("--length-scale", type=float, default=None, help="word-count multiplier")
    p.add_argument("--repeat", type=int, default=2, help="interleaved runs of each config")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--image-px",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(128, 896),
        help="MIN,MAX image side in pixels (multiples of 32)",
    )
    p.add_argument("--profile", action="store_true", help="time each phase of a step")
    p.add_argument("--configs", default=",".join(CONFIGS), help="of packed, unpacked, padded")
    p.add_argument("--padded-batch", type=int, default=4, help="examples per padded micro-batch")
    p.add_argument(
        "--compare-src",
        default=None,
        help="also run every config on this src/ directory (labelled @base), interleaved",
    )
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(run_config(args._child, args)))
        return
    args.forward = [
        *("--examples", str(args.examples), "--batch", str(args.batch)),
        *("--seq-len", str(args.seq_len), "--threads", str(args.threads)),
        *("--device", args.device, "--seed", str(args.seed)),
        *("--image-px", ",".join(map(str, args.image_px))),
        *(["--length-scale", str(args.length_scale)] if args.length_scale else []),
        *(["--profile"] if args.profile else []),
        *("--padded-batch", str(args.padded_batch)),
    ]
    results = []
    sources = [(None, "")] + ([(args.compare_src, "@base")] if args.compare_src else [])
    for rep in range(args.repeat):
        for name in args.configs.split(","):
            for src, tag in sources:
                r = child(name, args, src)
                r["config"] += tag
                r["repeat"] = rep
                results.append(r)
                report(rep, r)
    first = results[0]
    print(
        f"\n{first['examples']} timed examples of {first['min_tokens']}-{first['max_tokens']} tokens "
        f"(mean {first['mean_tokens']:.0f}; {first['dropped']} dropped), rows of {args.seq_len}"
    )
    best = {}
    for r in results:  # per config: the fastest repeat (least disturbed by other load)
        if r["config"] not in best or r["examples_per_s"] > best[r["config"]]["examples_per_s"]:
            best[r["config"]] = r
    for name, r in best.items():
        print(
            f"best {name:14s} {r['examples_per_s']:6.2f} ex/s {r['examples_per_cpu_s']:6.2f} ex/CPU-s"
            f"  peak RSS {r['peak_rss_mib']:5.0f} MiB"
        )
    for _, tag in sources:
        for other in ("unpacked", "padded"):
            a, b = best.get("packed" + tag), best.get(other + tag)
            if a and b:
                print(
                    f"packed{tag} / {other}{tag}: "
                    f"{a['examples_per_s'] / b['examples_per_s']:.2f}x ex/s, "
                    f"{a['examples_per_cpu_s'] / b['examples_per_cpu_s']:.2f}x ex/CPU-s, "
                    f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x peak RSS"
                )
    for _, tag in sources:
        ceiling(best.get("packed" + tag), best.get("unpacked" + tag), tag)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def ceiling(packed: dict | None, unpacked: dict | None, tag: str) -> None:
    """What packing could gain at most here: it saves a micro-batch's fixed cost (the
    difference of the two runs per micro-batch saved), never per-token or per-image
    work; with one micro-batch per optimizer step, none of that fixed cost is left."""
    if not (packed and unpacked and packed["micro_batches"] and unpacked["micro_batches"]):
        return
    t_packed = packed["examples"] / packed["examples_per_cpu_s"]
    t_unpacked = unpacked["examples"] / unpacked["examples_per_cpu_s"]
    saved = unpacked["micro_batches"] - packed["micro_batches"]
    fixed_s = (t_unpacked - t_packed) / saved
    floor_s = t_unpacked - (unpacked["micro_batches"] - unpacked["timed_steps"]) * fixed_s
    print(
        f"packing{tag}: {fixed_s * 1000:.0f} ms of CPU per micro-batch saved "
        f"({unpacked['micro_batches']} -> {packed['micro_batches']} micro-batches); one per "
        f"step ({unpacked['timed_steps']}) would reach {t_unpacked / floor_s:.2f}x unpacked"
    )


if __name__ == "__main__":
    main()
