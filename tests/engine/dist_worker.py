"""One training run of the tiny model, in one process or one torchrun rank.

    python tests/engine/dist_worker.py --out OUT [--mode full|lora] [--steps N] ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/engine/dist_worker.py ...

Every rank writes ``OUT/rank-<r>.json``: the loss and grad norm of each step (the
global batch of step s is the same whatever the number of ranks), and optionally a
coupled custom loss's grad norm and samples. Used by test_distributed.py.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.models.tiny import tiny_model_dir
from vlmtune.sdk import scale_weights, weighted_token_count
from vlmtune.sdk.client import TrainingClient
from vlmtune.types import AdamParams, SamplingParams

N_ROWS, BATCH = 8, 4


def png_url(seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rows(tc: TrainingClient) -> list:
    """Image rows and text-only rows (every third), so batches mix both."""
    out = []
    for i in range(N_ROWS):
        if i % 3 == 2:
            user = f"Say the number {i}."
        else:
            user = [
                {"type": "image_url", "image_url": {"url": png_url(i)}},
                {"type": "text", "text": "What digit is this?"},
            ]
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(i % 3)}]
        out.append(tc.datum_from_messages(msgs))
    return out


def step_batch(datums: list, step: int) -> list:
    """Four rows per step, but one at step 4 (an epoch's short tail): with two ranks,
    one rank then has nothing to do and runs a zero-weight copy instead of hanging."""
    return [datums[(step * 3 + j) % N_ROWS] for j in range(1 if step == 3 else BATCH)]


def pair_loss(datums: list, logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """A DPO-like loss coupling datum 0 with datum 1 (they may sit on different ranks)."""
    w = [
        torch.tensor(d.loss_fn_inputs["weights"].data, device=lp.device)
        for d, lp in zip(datums, logprobs, strict=False)
    ]
    margin = (logprobs[0] * w[0]).sum() - (logprobs[1] * w[1]).sum()
    return -torch.nn.functional.logsigmoid(0.1 * margin), {}


def without_weights(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` (and of the base an adapter names) with no weight files."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    adapter_config = out / "adapter_config.json"
    if adapter_config.is_file():
        cfg = json.loads(adapter_config.read_text())
        cfg["base_model_name_or_path"] = str(without_weights(tiny_model_dir(), out / "base"))
        adapter_config.write_text(json.dumps(cfg))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", default="full")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", type=Path)
    p.add_argument("--final", type=Path)
    p.add_argument("--custom", action="store_true")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--base", type=Path, help="model or adapter dir (default: the tiny model)")
    p.add_argument(
        "--weights-only-on-rank-0",
        action="store_true",
        help="other ranks get a copy of the model dir without its weight files",
    )
    p.add_argument("--fsdp", action="store_true", help="FSDP2 even in one process")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--shard-grad-op", action="store_true", help="keep layers gathered to backward")
    p.add_argument("--cpu-offload", action="store_true")
    p.add_argument("--replicate", action="store_true", help="DDP: whole model on every rank")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    torch.set_num_threads(1)
    base = args.base or tiny_model_dir()
    rank = int(os.environ.get("RANK", "0"))
    if args.weights_only_on_rank_0 and rank != 0:
        base = without_weights(base, args.out / f"model-rank-{rank}")
    config = EngineConfig(
        base_model=str(base),
        mode=args.mode,
        lora_rank=4,
        # Everything trains, the tied embedding / LM head and the vision tower included.
        freeze_vision_tower=False,
        freeze_projector=False,
        packing=True,
        max_row_tokens=256,
        min_pixels=4096,
        max_pixels=4096,
        device="cpu",
        fsdp=args.fsdp,
        gradient_checkpointing=args.checkpointing,
        fsdp_reshard_after_forward=not args.shard_grad_op,
        fsdp_cpu_offload=args.cpu_offload,
        precision=args.precision,
        replicate=args.replicate,
    )
    engine = TrainingEngine(config)
    tc = TrainingClient(engine, args.out)
    datums = rows(tc)
    result: dict = {
        "rank": engine.dist.rank,
        "world_size": engine.dist.world_size,
        "weight_files": sorted(p.name for p in Path(base).glob("*.safetensors")),
        # "DTensor" when FSDP2 sharded the model, else "Parameter".
        "param_type": type(next(engine.model.parameters()).data).__name__,
        "steps": {},
    }
    start = 0
    if args.resume:
        start = int(engine.load_state(args.resume)["step"])
    for step in range(start, args.steps):
        batch = step_batch(datums, step)
        fb = engine.forward_backward(scale_weights(batch, 1.0 / weighted_token_count(batch)))
        opt = engine.optim_step(AdamParams(learning_rate=1e-3))
        result["steps"][step + 1] = [fb.metrics["loss:sum"], opt.metrics["grad_norm"]]
        if step + 1 == args.save_at:
            engine.save_state(args.out / f"step-{step + 1}", extra={"step": step + 1})
    if args.custom:
        out = engine.forward_backward_custom(datums[:3], pair_loss)
        result["custom"] = [
            out.metrics["loss:sum"],
            engine.optim_step(AdamParams()).metrics["grad_norm"],
        ]
    if args.sample:
        samples = engine.sample(
            [datums[0].model_input, datums[2].model_input], 2, SamplingParams(max_tokens=3, seed=0)
        )
        result["samples"] = [[s.tokens for s in r.sequences] for r in samples]
    if args.final:
        engine.save_weights_for_sampler(args.final)
    if args.save_at:  # what each rank holds after the last step (replicas must agree)
        result["trainable_sum"] = sum(
            float(p.detach().double().sum()) for p in engine.trainable_params
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{engine.dist.rank}.json").write_text(json.dumps(result))
    if engine.dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
