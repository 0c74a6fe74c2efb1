"""SFT on a random-weight Qwen3-VL of a real size, one or more processes (FSDP2).

    .venv/bin/python benchmarks/fsdp_sft.py --size 2b --seq-len 4096 --fsdp  # FSDP2, 1 GPU
    .venv/bin/python benchmarks/fsdp_sft.py --size 2b --nproc 2 ...          # FSDP2, 2 GPUs

The model is built from the published dimensions of the size asked for
(``vlmtune.planning.memory.KNOWN_DIMS``; ``--layers`` shrinks the language model for a
CPU run), with random weights and the tiny model's tokenizer and processor, and written
once to ``~/.cache/vlmtune/random-<size>-<layers>l``: the engine then loads it like any
checkpoint. Each step is one packed row of ``--seq`` tokens per process (one 448x448
image, the rest text, every token weighted), forward_backward + AdamW.

Printed per rank: host memory (peak RSS while the engine was built, which is where
rank 0 alone reads the weights), and for the run: tokens/s, model FLOPs utilisation
(6 x active params x tokens + causal attention, over the GPU's dense bf16 peak), peak
``torch.cuda.max_memory_allocated`` and the planner's estimate for the same setup.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (no sparsity), by device-name substring.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
VISION_HEADS = 16
DEEPSTACK = {24: [5, 11, 17], 27: [8, 16, 24]}  # by vision depth


def rss_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+)", text).group(1))


def model_dir(size: str, layers: int | None) -> Path:
    """A random-weight checkpoint of ``size`` (built on first use)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.models.registry import get_model_spec
    from vlmtune.models.tiny import (
        build_tiny_processor,
        default_cache_root,
        qwen3_vl_config,
        tiny_model_dir,
    )
    from vlmtune.planning.memory import KNOWN_DIMS

    if size == "tiny":
        return tiny_model_dir()
    dims = KNOWN_DIMS[get_model_spec(f"qwen3-vl-{size}").name]
    n_layers = layers or dims.layers
    out = default_cache_root() / f"random-{size}-{n_layers}l"
    if (out / "config.json").is_file():
        return out
    text = {
        "vocab_size": dims.vocab,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": dims.tied_embeddings,
    }
    if dims.experts:
        text |= {
            "num_experts": dims.experts,
            "num_experts_per_tok": dims.experts_active,
            "moe_intermediate_size": dims.intermediate,
        }
    vision = {
        "depth": dims.vision_layers,
        "hidden_size": dims.vision_hidden,
        "intermediate_size": dims.vision_intermediate,
        "num_heads": VISION_HEADS,
        "out_hidden_size": dims.hidden,
        "num_position_embeddings": dims.vision_positions,
        "deepstack_visual_indexes": DEEPSTACK[dims.vision_layers],
    }
    config = qwen3_vl_config(text, vision, tied=dims.tied_embeddings)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    build_tiny_processor(tmp)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp), safe_serialization=True)
    os.rename(tmp, out)
    return out


def step_data(engine, seq: int, seed: int) -> list:
    """One row's worth: a 448x448 image example and random text filling the row to
    ``seq`` tokens, every token weighted."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from vlmtune.data.schema import ImagePart, Message, TextPart
    from vlmtune.render import datum_from_rendered
    from vlmtune.sdk import datum_from_tokens_weights

    pixels = np.random.default_rng(seed).integers(0, 255, size=(448, 448, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = ImagePart(data=buf.getvalue(), mime="image/png", width=448, height=448)
    msgs = [
        Message(role="user", parts=[image, TextPart("Describe the image.")]),
        Message(role="assistant", parts=[TextPart("x")]),
    ]
    datum = datum_from_rendered(engine.renderer.render(msgs), engine.image_token_id)
    room = seq - datum.model_input.length - 1
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 150_000, (room + 1,), generator=gen).tolist()
    return [datum, datum_from_tokens_weights(text, [1.0] * (room + 1))]


def run(args: argparse.Namespace) -> None:
    import torch

    from vlmtune.engine.engine import EngineConfig, TrainingEngine
    from vlmtune.models.registry import get_model_spec
    from vlmtune.planning.memory import dims_from_config, estimate_memory
    from vlmtune.types import AdamParams

    path = Path(args.model_dir)
    cuda = torch.cuda.is_available() and not args.cpu
    start = time.perf_counter()
    engine = TrainingEngine(
        EngineConfig(
            base_model=str(path),
            mode=args.mode,
            precision="bf16" if cuda else "fp32",
            device="cuda" if cuda else "cpu",
            packing=True,
            max_row_tokens=args.seq,
            gradient_checkpointing=args.checkpointing,
            freeze_embeddings=args.freeze_embeddings,
            fsdp=args.fsdp,
            min_pixels=448 * 448,
            max_pixels=448 * 448,
        )
    )
    load_s = time.perf_counter() - start
    rank, world = engine.dist.rank, engine.dist.world_size
    build_peak_mib = rss_kib("VmHWM") / 1024
    # Every rank passes the same global batch (one row per rank), as recipes do; the
    # engine gives each rank its share.
    batches = [
        [d for r in range(world) for d in step_data(engine, args.seq, seed=s * world + r)]
        for s in range(args.steps + 1)
    ]
    tokens_per_step = sum(d.model_input.length for d in batches[0])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for s, batch in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.forward_backward(batch)
        engine.optim_step(AdamParams(learning_rate=1e-5))
        if cuda:
            torch.cuda.synchronize()
        if s > 0:  # step 0 is warm-up (allocator, kernels)
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    dims = dims_from_config(json.loads((path / "config.json").read_text()))
    spec = get_model_spec(str(path))
    active = spec.active_params
    # Causal attention: QK^T and AV, forward and backward (x3), half the matrix.
    attn = 3 * 2 * 2 * dims.layers * dims.q_dim * args.seq * args.seq / 2
    flops_per_step = 6 * active * tokens_per_step + world * attn
    est = estimate_memory(
        dims,
        mode=args.mode,
        context=args.seq,
        world_size=world,
        fsdp=engine.dist.enabled,
        device="cuda" if cuda else "cpu",
        activation_checkpointing=args.checkpointing,
        freeze_embeddings=args.freeze_embeddings,
    )
    result = {
        "rank": rank,
        "world_size": world,
        "load_s": round(load_s, 1),
        "host_peak_while_loading_mib": round(build_peak_mib),
        "loss": out.metrics.get("loss:sum"),
    }
    if rank == 0:
        result |= {
            "params": active,
            "tokens_per_step": tokens_per_step,
            "step_s": round(step_s, 3),
            "tokens_per_s": round(tokens_per_step / step_s, 1),
            "estimate_gib": round(est.total / 2**30, 2),
            "estimate_without_runtime_overhead_gib": round((est.total - est.overhead) / 2**30, 2),
        }
        if cuda:
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            result |= {
                "device": name,
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                "mfu": round(flops_per_step / step_s / (world * peak), 3) if peak else None,
            }
    print(json.dumps(result), flush=True)
    if engine.dist.enabled:
        torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2b", help="2b, 4b, 8b, 32b, 30b-a3b, 235b-a22b or tiny")
    p.add_argument("--layers", type=int, help="language-model layers (default: the real count)")
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--seq-len", "--seq", dest="seq", type=int, default=4096, help="tokens per row")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun, FSDP2 if > 1)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 even in one process")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--freeze-embeddings", action="store_true")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is there")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # set for the worker processes
    args = p.parse_args()
    if args.model_dir:
        return run(args)
    args.model_dir = str(model_dir(args.size, args.layers))
    forwarded = [
        *("--mode", args.mode, "--seq", str(args.seq), "--steps", str(args.steps)),
        *("--model-dir", args.model_dir),
        *(["--checkpointing"] if args.checkpointing else []),
        *(["--fsdp"] if args.fsdp else []),
        *(["--freeze-embeddings"] if args.freeze_embeddings else []),
        *(["--cpu"] if args.cpu else []),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={args.nproc}", __file__, *forwarded]
    else:
        cmd = [sys.executable, __file__, *forwarded]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
