"""Small pieces every recipe composes: schedules, data order, the run directory, logging."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from vlmtune.config import JobFile
from vlmtune.engine.distributed import is_main_process
from vlmtune.sdk import ServiceClient, TrainingClient
from vlmtune.types import AdamParams

CHECKPOINT_PREFIX = "step-"


def main_process_log(log: Any) -> Any:
    """``log`` on rank 0; a no-op elsewhere (N ranks would print every line N times)."""
    return log if is_main_process() else (lambda *args, **kwargs: None)


def learning_rate_at(
    step: int, total_steps: int, peak: float, warmup_ratio: float, scheduler: str
) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then linear/cosine/constant.

    Warmup ramps ``peak * (step + 1) / warmup_steps`` so step 0 already moves.
    """
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if scheduler == "constant" or total_steps <= warmup_steps:
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def batch_indices(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a fixed function of (step, seed).

    Each epoch is a fresh seeded permutation; the last batch of an epoch may be short.
    Being a pure function of the step is what makes ``--resume`` replay the same order.
    """
    spe = steps_per_epoch(n_examples, batch_size)
    epoch, within = divmod(step, spe)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[within * batch_size : (within + 1) * batch_size]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [
        p
        for p in (run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "state.json").exists()
    ]
    return max(ckpts, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step or eval; on resume, later lines are cut."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.enabled = is_main_process()  # other ranks compute the same records
        if not self.enabled:
            return
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(f"{line}\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ProgressBar:
    """A rich bar (loss, examples/s, time left) on a terminal; plain lines otherwise."""

    def __init__(
        self,
        total: int,
        start: int,
        description: str,
        stream: TextIO | None = None,
        label: str = "loss",  # what the number shown is (RL shows the mean reward)
    ) -> None:
        stream = stream or sys.stderr  # looked up per call: tests and notebooks swap it
        self.total, self.start_step, self.label = total, start, label
        self.enabled = is_main_process()
        self.interactive = self.enabled and stream.isatty()
        self.last_print = 0.0
        self.stream = stream
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(label + " {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[eps]:.1f} ex/s"),
            TimeRemainingColumn(),
            disable=not self.interactive,
        )
        self.task = self.progress.add_task(
            description, total=total, completed=start, loss=float("nan"), eps=0.0
        )

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, examples_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, eps=examples_per_s)
        now = time.monotonic()
        if not self.enabled:
            return
        if not self.interactive and (now - self.last_print > 10 or step == self.total):
            self.last_print = now
            print(
                f"step {step}/{self.total}  {self.label} {loss:.4f}  {examples_per_s:.1f} ex/s",
                file=self.stream,
            )


def adam_params(hp: Any, learning_rate: float) -> AdamParams:
    """The optimizer settings of ``[hyperparameters]`` at this step's learning rate."""
    return AdamParams(
        learning_rate=learning_rate,
        beta1=hp.adam_beta1,
        beta2=hp.adam_beta2,
        eps=hp.adam_eps,
        weight_decay=hp.weight_decay,
        grad_clip_norm=hp.max_grad_norm,
    )


def resume_start_step(tc: Any, run_dir: Path, resume: bool, log: Any = print) -> int:
    """The step to start from: 0, or the latest checkpoint's (its state is loaded into ``tc``)."""
    if not resume:
        return 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        log(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; starting from step 0")
        return 0
    step = int(tc.load_state(str(ckpt)).result()["step"])
    log(f"resumed from {ckpt} (step {step})")
    return step


def create_training_client(job: JobFile, run_dir: Path) -> TrainingClient:
    """The job's model, adapter and vision settings as an in-process training client.

    Packing applies to every method: DPO pairs and RL completions are short, and packing
    them into rows of ``sequence_length`` tokens makes a CPU step 10-40x faster than one
    example per micro-batch, with per-example outputs unchanged.
    """
    mode = job.finetune_mode
    return ServiceClient().create_training_client(
        job.job.model,
        checkpoint_dir=run_dir / "checkpoints",
        lora_rank=0 if mode == "full" else job.lora.r,
        mode=mode,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        target_modules=job.lora.target_modules,
        freeze_vision_tower=job.model.freeze_vision_tower,
        freeze_projector=job.model.freeze_projector,
        freeze_embeddings=job.model.freeze_embeddings,
        min_pixels=job.model.min_pixels,
        max_pixels=job.model.max_pixels,
        max_images_per_message=job.model.max_images_per_message,
        precision="bf16" if job.training.precision == "bf16" else "fp32",
        device=job.training.device,
        micro_batch_size=job.hyperparameters.per_device_batch,
        packing=job.hyperparameters.packing,
        max_row_tokens=job.hyperparameters.sequence_length,
        gradient_checkpointing=job.training.gradient_checkpointing,
        attention=job.training.attention,
        seed=job.hyperparameters.seed,
        image_cache_dir=job.training.image_cache_dir,
        # Under torchrun (`vlmtune train --nproc N` or [compute] gpu_count > 1), or in one
        # process with [compute] fsdp / cpu_offload.
        fsdp=job.compute.fsdp,
        fsdp_reshard_after_forward=job.compute.sharding == "full_shard",
        fsdp_reduce_dtype=job.compute.reduce_dtype,
        fsdp_cpu_offload=job.compute.cpu_offload,
    )
