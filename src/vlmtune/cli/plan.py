"""`vlmtune shapes` and `vlmtune plan`: memory per GPU before a run, from the estimator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from vlmtune.config import ConfigError, JobFile, load_job
from vlmtune.planning.fit import breakdown as _breakdown
from vlmtune.planning.fit import fits, remedies, shortfall
from vlmtune.planning.fit import gib as _gib
from vlmtune.planning.memory import MemoryEstimate, Mode, dims_for, estimate_memory
from vlmtune.planning.shapes import (
    FIT_HEADROOM,
    TrainingShape,
    get_shape,
    gpu_memory_gib,
    list_shapes,
)

MODES: tuple[Mode, ...] = ("full", "lora", "qlora")
__all__ = ["fits", "plan", "register", "shape_estimate", "shapes"]


def shape_estimate(shape: TrainingShape, mode: Mode) -> MemoryEstimate:
    """The shape's plan for ``mode`` (its mode settings applied), on a row that may be
    all image tokens: a shape is sized for any data."""
    shape = shape.for_mode(mode)
    on_cpu = shape.gpu_type == "cpu"
    return estimate_memory(
        dims_for(shape.model),
        mode=mode,
        context=shape.max_context,
        world_size=shape.world_size,
        activation_checkpointing=shape.activation_checkpointing,
        device="cpu" if on_cpu else "cuda",
        precision=shape.precision,
        cpu_offload=shape.cpu_offload,
        reshard_after_forward=shape.sharding == "full_shard",
        replicate=shape.sharding == "replicate",
        reduce_dtype=shape.reduce_dtype,
        image_tokens=shape.max_context,
    )


def _split(shape: TrainingShape, mode: str) -> str:
    shape = shape.for_mode(mode)
    if shape.world_size == 1 and not shape.cpu_offload:
        return "one"
    return "dp" if shape.sharding == "replicate" or mode == "qlora" else "fsdp"


def shapes(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List the training shapes with their estimated memory per GPU (LoRA rank 16)."""
    header = (
        f"{'shape':24} {'model':34} {'context':>7} {'GPUs':>10} {'split':5} {'mode':5} "
        f"{'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'total':>6} {'GPU':>6} fits "
        "settings"
    )
    if not as_json:
        typer.echo(header + "\n" + "-" * len(header))
    for shape in list_shapes():
        for mode in shape.modes:
            est = shape_estimate(shape, mode)
            ok = fits(est, shape.gpu_type)
            capacity = gpu_memory_gib(shape.gpu_type)
            if as_json:
                record: dict[str, object] = {
                    "shape": shape.name,
                    "model": shape.model,
                    "mode": mode,
                }
                record.update(context=shape.max_context, gpu_type=shape.gpu_type)
                record.update(gpu_count=shape.gpu_count, nodes=shape.nodes, fits=ok)
                record.update(split=_split(shape, mode))
                own = shape.for_mode(mode)
                record.update(activation_checkpointing=own.activation_checkpointing)
                record.update(cpu_offload=own.cpu_offload)
                typer.echo(json.dumps({**record, "bytes_per_gpu": est.as_dict()}))
                continue
            gpus = f"{shape.nodes}x{shape.gpu_count} {shape.gpu_type}"
            typer.echo(
                f"{shape.name:24} {shape.model:34} {shape.max_context:>7} {gpus:>10} "
                f"{_split(shape, mode):5} {mode:5} "
                f"{_gib(est.weights):>7} {_gib(est.grads):>6} {_gib(est.optimizer):>6} "
                f"{_gib(est.activations):>6} {_gib(est.total):>6} "
                f"{(f'{capacity:.0f}' if capacity else '-'):>6} "
                f"{'yes' if ok else ('-' if ok is None else 'NO'):4} {_shape_settings(shape, mode, est)}"
            )
    if not as_json:
        typer.echo(
            "GiB per GPU; split: fsdp (FSDP2 shards the model), dp (data-parallel: the whole "
            "model on each GPU, trainable gradients all-reduced; qlora), one (one GPU); "
            "activations of one packed row at the shape's context, all image tokens at worst, "
            f"with its checkpointing setting; fits = total <= {FIT_HEADROOM:.0%} of the GPU; "
            "settings: ckpt (activation checkpointing), offload (shards and AdamW state in "
            "host memory, GiB per process). "
            "Estimates: only tiny-2k-cpu2 has been run."
        )


def _shape_settings(shape: TrainingShape, mode: str, est: MemoryEstimate) -> str:
    own = shape.for_mode(mode)
    words = ["ckpt"] if own.activation_checkpointing else []
    words += [f"offload(+{_gib(est.host)} host)"] if est.host else []
    return ",".join(words) or "-"


def _job_settings(job: JobFile, nproc: int | None, image_tokens: int | None) -> dict[str, Any]:
    c, t = job.compute, job.training
    on_cpu = c.gpu_type == "cpu" or t.device == "cpu"
    if c.gpu_type == "auto" and not on_cpu:
        import torch

        on_cpu = not torch.cuda.is_available()
    return {
        "context": job.hyperparameters.sequence_length,
        "world_size": (nproc or c.gpu_count) * c.nodes,
        "device": "cpu" if on_cpu else "cuda",
        "precision": "fp32" if on_cpu or t.precision == "fp32" else "bf16",
        "lora_rank": job.lora.r,
        "cpu_offload": c.cpu_offload,
        "fsdp": c.fsdp or c.cpu_offload,
        "replicate": c.sharding == "replicate",
        "reshard_after_forward": c.sharding == "full_shard",
        "reduce_dtype": c.reduce_dtype,
        "freeze_vision": job.model.freeze_vision_tower and job.model.freeze_projector,
        "freeze_embeddings": job.model.freeze_embeddings,
        "packed": job.hyperparameters.packing,
        "attention": t.attention,
        # Unset: the whole row may be image tokens (packed rows of image-heavy examples).
        "image_tokens": job.hyperparameters.sequence_length
        if image_tokens is None
        else image_tokens,
    }


def _mode_settings(job: JobFile, mode: Mode, settings: dict[str, Any]) -> dict[str, Any]:
    """The job's settings as a job of ``mode`` would have them: a qlora job replicates
    because of qlora (the other modes' rows show FSDP2), and a shape may set CPU
    offload per mode."""
    qlora_only = job.finetune_mode == "qlora" and mode != "qlora"
    row = {**settings, "replicate": settings["replicate"] and not qlora_only}
    if job.compute.shape_name is not None:
        offload = get_shape(job.compute.shape_name).for_mode(mode).cpu_offload
        row |= {"cpu_offload": offload, "fsdp": job.compute.fsdp or offload}
    return row


def _runs_with(job: JobFile, settings: dict[str, Any], est: MemoryEstimate) -> list[str]:
    """The settings that decide this job's memory, in words."""
    mode, n = job.finetune_mode, settings["world_size"]
    ckpt = job.training.gradient_checkpointing
    lines = [
        f"sharding: {_parallelism(mode, settings)}",
        "activation checkpointing: "
        + ("on (each layer's input kept, one layer recomputed in backward)" if ckpt else "off"),
    ]
    if settings["attention"] == "sdpa":
        lines.append(
            "attention: packed rows attend per example (flash-attn varlen on CUDA when "
            "flash_attn is installed, else SDPA per segment): no T x T mask"
        )
    else:
        lines.append("attention: flash_attention_2 (varlen over the packed row's examples)")
    frozen_head = mode != "full" or settings["freeze_embeddings"]
    lines.append(
        "LM head: "
        + (
            "frozen, gradient made in forward chunk by chunk"
            if frozen_head
            else "chunked log-softmax, each chunk checkpointed"
        )
        + " (never T x vocab logits; a fused Liger / Cut Cross-Entropy kernel, when "
        "installed, needs less: not counted)"
    )
    if est.host:
        per_node = est.host * (n // job.compute.nodes)
        lines.append(
            f"CPU offload: on; shards and AdamW state in host memory, {_gib(est.host)} GiB "
            f"per process, {_gib(per_node)} GiB per node"
        )
    else:
        lines.append("CPU offload: off")
    img = settings["image_tokens"]
    vision = "frozen (runs without autograd)" if settings["freeze_vision"] else "trainable"
    lines.append(
        f"vision tower: {vision}; rows counted with up to {img:,} image tokens "
        "(--image-tokens to change)"
    )
    return lines


def _gpu_type(job: JobFile) -> str:
    if job.compute.gpu_type != "auto":
        return job.compute.gpu_type
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().upper()
    return next(
        (k for k in ("H200", "H100", "B200", "A100", "L40S", "L4", "A10G") if k in name), name
    )


def _parallelism(mode: str, settings: dict[str, Any]) -> str:
    """How this job's processes split the work, in words."""
    n = settings["world_size"]
    if n == 1 and not settings["fsdp"]:
        return "one process"
    if n > 1 and (settings["replicate"] or mode == "qlora"):
        return f"data-parallel over {n} (whole model per GPU, trainable gradients all-reduced)"
    return (
        f"FSDP2 over {n} ({'full_shard' if settings['reshard_after_forward'] else 'shard_grad_op'})"
    )


def plan(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML job file")],
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, help="processes per node")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    image_tokens: Annotated[
        int | None,
        typer.Option(
            "--image-tokens", min=0, help="image positions per row (default: the whole row)"
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides")
    ] = None,
) -> None:
    """Parameters and memory per GPU of a job: full / LoRA / QLoRA, with and without
    activation checkpointing (the job's own setting marked *); the settings it runs
    with, and if it does not fit, which part is too big and what each change gives."""
    try:
        job = load_job(config, overrides or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if not as_json:
        from vlmtune.cli.train import report_resolved

        report_resolved(job, typer.echo)
    settings = _job_settings(job, nproc, image_tokens)
    gpu_type = _gpu_type(job)
    dims = dims_for(job.job.model)
    rows = []
    for mode in MODES:
        row = _mode_settings(job, mode, settings)
        for ac in (False, True):
            est = estimate_memory(dims, mode=mode, activation_checkpointing=ac, **row)
            own = mode == job.finetune_mode and ac == job.training.gradient_checkpointing
            rows.append((mode, ac, own, est, fits(est, gpu_type)))
    own_est = next(r[3] for r in rows if r[2])
    own_settings = {
        **_mode_settings(job, job.finetune_mode, settings),
        "activation_checkpointing": job.training.gradient_checkpointing,
    }
    why_not = shortfall(own_est, gpu_type)
    helps = []
    if why_not:
        helps = remedies(
            lambda **change: estimate_memory(
                dims, mode=job.finetune_mode, **{**own_settings, **change}
            ),
            {**own_settings, "mode": job.finetune_mode},
            gpu_type,
        )
    if as_json:
        out = {"model": job.job.model, "gpu_type": gpu_type, **settings, "estimates": []}
        for mode, ac, own, est, ok in rows:
            row = {"mode": mode, "activation_checkpointing": ac, "job": own, "fits": ok}
            out["estimates"].append({**row, "bytes_per_gpu": est.as_dict()})
        out |= {"runs_with": _runs_with(job, own_settings, own_est)}
        out |= {"does_not_fit": why_not, "remedies": helps}
        typer.echo(json.dumps(out))
        return
    typer.echo(
        f"{job.job.model}: {dims.total_params:,} parameters; this job ({job.finetune_mode}) "
        f"trains {own_est.trainable_params:,}"
    )
    typer.echo(
        f"{settings['world_size']} process(es) on {gpu_type}, {settings['context']:,}-token rows, "
        f"{settings['precision']}; {_parallelism(job.finetune_mode, settings)}"
    )
    typer.echo(
        f"  {'mode':6} {'act.ckpt':8} {'weights':>8} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'other':>6} {'total':>7}  fits (GiB per GPU)"
    )
    for mode, ac, own, est, ok in rows:
        mark = "*" if own else " "
        typer.echo(
            f"{mark} {mode:6} {'on' if ac else 'off':8} {_gib(est.weights):>8} "
            f"{_gib(est.grads):>7} {_gib(est.optimizer):>7} {_gib(est.activations):>7} "
            f"{_gib(est.overhead):>6} {_gib(est.total):>7}  "
            f"{'yes' if ok else ('?' if ok is None else 'NO')}"
            + (f"  (+{_gib(est.host)} GiB host)" if est.host else "")
            + (f"  [{'; '.join(est.notes)}]" if est.notes else "")
        )
    typer.echo("this job runs with:")
    for line in _runs_with(job, own_settings, own_est):
        typer.echo(f"  {line}")
    if not why_not:
        verdict = fits(own_est, gpu_type)
        if verdict:
            typer.echo(f"this job fits {gpu_type}: {_gib(own_est.total)} GiB per GPU")
            for line in _breakdown(own_est):
                typer.echo(f"  {line}")
        return
    typer.echo(f"this job {why_not[0]}")
    for line in why_not[1:] + helps:
        typer.echo(f"  {line}")


def register(app: typer.Typer) -> None:
    app.command("shapes")(shapes)
    app.command("plan")(plan)
