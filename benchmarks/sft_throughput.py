"""SFT throughput, vlmtune against TRL's SFTTrainer, on the same machine in one run.

    .venv/bin/python benchmarks/sft_throughput.py [--examples 400] [--repeat 2]

The job: the tiny Qwen3-VL (``tiny-qwen3-vl``), the first N digits rows, effective batch
8, images at min = max = 4,096 pixels (4 tokens each), fp32 on CPU, AdamW lr 1e-3 with
5% linear warmup then cosine, grad clip 1.0, loss on assistant tokens only. Each
configuration runs in its own subprocess (peak RSS is that run's alone) with the same
torch thread count; the first optimizer step is warm-up and not timed.

vlmtune's timed work also includes the one-off work it does up front that TRL does per
step: rendering (chat template + tokenisation) and image preprocessing (``prefetch``,
which uses worker processes only where they pay). TRL runs from ``benchmarks/.trl-env`` (pinned, installed there on
first use with ``pip --target``), never from vlmtune's own environment.

Pairs compared (ratio = vlmtune / TRL examples/s):
  matched : vlmtune's best config for this job (examples/digits/sft.toml: packing,
            frozen tied embedding) vs TRL with the same trainable set, no checkpointing,
            images decoded in 2 DataLoader workers or in-process (the faster counts);
  defaults: everything trainable on both sides; TRL with its own defaults
            (gradient checkpointing on, no DataLoader workers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "digits" / "data" / "train.jsonl"
# "site-packages" in the path matters: dill (used by datasets to fingerprint) pickles
# modules from any other directory by value, which fails for pyarrow.
TRL_ENV = ROOT / "benchmarks" / ".trl-env" / "site-packages"
# TRL and what it needs beyond vlmtune's environment, pinned (installed with --no-deps
# so torch/transformers are never replaced).
TRL_PINS = [
    "trl==1.16.0", "datasets==5.2.0", "pyarrow==26.0.1", "pandas==3.1.1", "dill==0.4.1",
    "multiprocess==0.70.19", "xxhash==4.1.0", "python-dateutil==4.0.0", "tzdata==2026.6",
    "six==1.17.0",
]  # fmt: skip
# TRL requirements normally present in vlmtune's environment; installed too if absent.
TRL_SHARED = {
    "accelerate": "accelerate==1.15.0",
    "psutil": "psutil==7.2.2",
    "yaml": "PyYAML==6.0.3",
}

VLMTUNE = {
    # name: freeze_embeddings (both: packing, vision tower + projector trained)
    "vlmtune": True,
    "vlmtune-all-trainable": False,
}
# pair: (vlmtune config, TRL configs: the fastest of them is compared)
PAIRS = {
    "matched": ("vlmtune", ("trl-matched", "trl-matched-w0")),
    "defaults": ("vlmtune-all-trainable", ("trl-defaults",)),
}


def rss_mib() -> float:
    """This process's resident memory now (the same on both sides)."""
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) / 1024


def run_vlmtune(name: str, examples: int, batch: int, threads: int, profile: bool) -> dict:
    """One vlmtune configuration in this process."""
    import torch

    torch_mib = rss_mib()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # The engine imports the Qwen3-VL modules lazily (~240 MiB); import them here so
    # that the "all imports" baseline holds what TRL's does.
    import transformers.models.qwen3_vl.modeling_qwen3_vl  # noqa: F401

    from vlmtune.data import load_dataset
    from vlmtune.engine.prefetch import prefetch_images
    from vlmtune.recipes.common import learning_rate_at
    from vlmtune.render_rows import build_sft_datums
    from vlmtune.sdk import AdamParams, ServiceClient, scale_weights, weighted_token_count

    imports_mib = rss_mib()

    rows, _ = load_dataset(DATA, "sft")
    rows = rows[:examples]
    tc = ServiceClient().create_training_client(
        "tiny-qwen3-vl",
        lora_rank=0,
        mode="full",
        freeze_vision_tower=False,
        freeze_projector=False,
        freeze_embeddings=VLMTUNE[name],
        min_pixels=4096,
        max_pixels=4096,
        packing=True,
        max_row_tokens=256,
        precision="fp32",
        device="cpu",
    )
    t_prep = time.perf_counter()
    datums, _ = build_sft_datums(rows, tc.renderer, sequence_length=256, train_on="all_assistant")
    # The library default: worker processes only when they pay (not for 32x32 PNGs).
    prefetch = prefetch_images(datums, tc.engine.image_preprocessor)
    prep_s = time.perf_counter() - t_prep
    steps = [datums[i : i + batch] for i in range(0, len(datums) - batch + 1, batch)]

    def step(i: int) -> None:
        b = steps[i]
        lr = learning_rate_at(i, len(steps), 1e-3, 0.05, "cosine")
        tc.forward_backward(scale_weights(b, 1.0 / weighted_token_count(b))).result()
        tc.optim_step(AdamParams(learning_rate=lr, eps=1e-8, grad_clip_norm=1.0)).result()

    step(0)  # warm-up: allocator, optimizer state
    timer = None
    if profile:
        from vlmtune.engine.step_profile import StepProfile

        timer = tc.engine.profile = StepProfile(tc.engine.device)
    t0 = time.perf_counter()
    for i in range(1, len(steps)):
        step(i)
    loop_s = time.perf_counter() - t0
    elapsed = loop_s + prep_s
    timed = [d for b in steps[1:] for d in b]
    trainable = sum(p.numel() for p in tc.engine.trainable_params)
    return {
        "config": name,
        "examples": len(timed),
        "examples_per_s": len(timed) / elapsed,
        "tokens_per_s": sum(d.model_input.length for d in timed) / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_torch_mib": torch_mib,
        "rss_after_imports_mib": imports_mib,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "trainable_params": trainable,
        "tokens_per_example": datums[0].model_input.length + 1,  # + the last target
        "loss_tokens_per_example": weighted_token_count(datums[:1]),
        "image_workers": prefetch.workers,
        "prep_s": prep_s,
        "cache": tc.engine.image_preprocessor.cache_info(),
        "profile": timer.table(loop_s) if timer else None,
    }


def ensure_trl_env() -> Path:
    """Install the pinned TRL environment under benchmarks/.trl-env on first use."""
    marker = TRL_ENV / ".pins"
    extra = [spec for mod, spec in TRL_SHARED.items() if importlib.util.find_spec(mod) is None]
    wanted = "\n".join(TRL_PINS + extra)
    if marker.is_file() and marker.read_text() == wanted:
        return TRL_ENV
    print(f"installing TRL into {TRL_ENV} (once) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
         "--target", str(TRL_ENV), *TRL_PINS, *extra],
        check=True,
    )  # fmt: skip
    marker.write_text(wanted)
    return TRL_ENV


def child(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-6000:])
        raise SystemExit(f"{cmd[2:4]} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    trl_env = {**env, "PYTHONPATH": os.pathsep.join([str(ensure_trl_env()), str(ROOT / "src")])}
    common = ["--examples", str(args.examples), "--batch", str(args.batch)]
    common += ["--threads", str(args.threads), "--workers", str(args.workers)]
    names = [n for pair in args.pairs.split(",") for n in (PAIRS[pair][0], *PAIRS[pair][1])]
    results = []
    for rep in range(args.repeat):
        for name in names:
            if name in VLMTUNE:
                cmd = [sys.executable, __file__, "--_child", name, *common]
                r = child(cmd + (["--profile"] if args.profile else []), env)
            else:
                trl = str(ROOT / "benchmarks" / "trl_baseline.py")
                r = child([sys.executable, trl, name, "--data", str(DATA), *common], trl_env)
            r["repeat"] = rep
            results.append(r)
            print(
                f"[{rep}] {r['config']:22s} {r['examples_per_s']:7.1f} ex/s "
                f"{r['tokens_per_s']:7.0f} tok/s  peak RSS {r['peak_rss_mib']:6.0f} MiB "
                f"(+{added(r, 'torch'):4.0f} over import torch, +{added(r, 'imports'):4.0f} over "
                f"all imports; children' {r['worker_peak_rss_mib']:4.0f})  "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if r.get("profile"):
                print(r["profile"], flush=True)
    return results


def added(r: dict, baseline: str) -> float:
    """Peak RSS above the process's RSS after ``import torch`` (``torch``, ~500-700 MiB,
    the same on both sides) or after all of its imports (``imports``)."""
    return r["peak_rss_mib"] - r[f"rss_after_{baseline}_mib"]


def summarise(results: list[dict], pairs: list[str]) -> None:
    """Speed: the fastest repeat per config (least disturbed by other load). Memory: the
    mean over repeats (it does not depend on load)."""
    best: dict[str, dict] = {}
    for r in results:
        if r["config"] not in best or r["examples_per_s"] > best[r["config"]]["examples_per_s"]:
            best[r["config"]] = dict(r)
    for name, b in best.items():
        runs = [r for r in results if r["config"] == name]
        for key in ("peak_rss_mib", "rss_after_torch_mib", "rss_after_imports_mib"):
            b[key] = sum(r[key] for r in runs) / len(runs)
    print("\nbest of repeats (speed), mean of repeats (memory):")
    print(
        f"{'pair':9s} {'config':22s} {'ex/s':>7s} {'tok/s':>7s} {'peak RSS':>8s} "
        f"{'+torch':>7s} {'+imports':>8s} {'trainable':>10s}"
    )
    for pair in pairs:
        v = best[PAIRS[pair][0]]
        trls = [best[n] for n in PAIRS[pair][1]]
        t = max(trls, key=lambda r: r["examples_per_s"])
        for r in (v, *trls):
            print(
                f"{pair:9s} {r['config']:22s} {r['examples_per_s']:7.1f} {r['tokens_per_s']:7.0f} "
                f"{r['peak_rss_mib']:8.0f} {added(r, 'torch'):7.0f} {added(r, 'imports'):8.0f} "
                f"{r['trainable_params']:10,d}"
            )
        print(
            f"{pair:9s} {'ratio vlmtune/TRL':22s} {v['examples_per_s'] / t['examples_per_s']:6.2f}x "
            f"{v['tokens_per_s'] / t['tokens_per_s']:6.2f}x {v['peak_rss_mib'] / t['peak_rss_mib']:7.2f}x "
            f"{added(v, 'torch') / added(t, 'torch'):6.2f}x "
            f"{added(v, 'imports') / added(t, 'imports'):7.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--pairs", default="matched,defaults", help=f"of {sorted(PAIRS)}")
    parser.add_argument("--repeat", type=int, default=1, help="run every config this often")
    # One intra-op thread by default: the tiny model's matrices gain nothing from more,
    # and on a loaded machine OpenMP spin-waiting makes 2 threads many times slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="TRL DataLoader workers in trl-matched (vlmtune's prefetch picks its own)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print where vlmtune's step time goes (data, forward, lm_head, loss, "
        "backward, optimizer), timed with synchronisation on CUDA",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        r = run_vlmtune(args._child, args.examples, args.batch, args.threads, args.profile)
        print(json.dumps(r))
        return
    if not DATA.exists():
        subprocess.run([sys.executable, str(ROOT / "examples/digits/make_data.py")], check=True)
    results = run_all(args)
    summarise(results, args.pairs.split(","))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
