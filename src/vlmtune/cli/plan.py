"""`vlmtune shapes` and `vlmtune plan`: memory per GPU before a run, from the estimator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from vlmtune.config import ConfigError, JobFile, load_job
from vlmtune.planning.memory import GIB, MemoryEstimate, Mode, dims_for, estimate_memory
from vlmtune.planning.shapes import FIT_HEADROOM, TrainingShape, gpu_memory_gib, list_shapes

MODES: tuple[Mode, ...] = ("full", "lora", "qlora")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def fits(estimate: MemoryEstimate, gpu_type: str) -> bool | None:
    """Whether the estimate fits one GPU of ``gpu_type`` with headroom (None: unknown type)."""
    capacity = gpu_memory_gib(gpu_type)
    if capacity is None:
        return None
    return estimate.total <= FIT_HEADROOM * capacity * GIB


def shape_estimate(shape: TrainingShape, mode: Mode) -> MemoryEstimate:
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
    )


def _split(shape: TrainingShape, mode: str) -> str:
    if shape.world_size == 1 and not shape.cpu_offload:
        return "one"
    return "dp" if shape.sharding == "replicate" or mode == "qlora" else "fsdp"


def shapes(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List the training shapes with their estimated memory per GPU (LoRA rank 16)."""
    header = (
        f"{'shape':24} {'model':34} {'context':>7} {'GPUs':>10} {'split':5} {'mode':5} "
        f"{'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'total':>6} {'GPU':>6} fits"
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
                typer.echo(json.dumps({**record, "bytes_per_gpu": est.as_dict()}))
                continue
            gpus = f"{shape.nodes}x{shape.gpu_count} {shape.gpu_type}"
            typer.echo(
                f"{shape.name:24} {shape.model:34} {shape.max_context:>7} {gpus:>10} "
                f"{_split(shape, mode):5} {mode:5} "
                f"{_gib(est.weights):>7} {_gib(est.grads):>6} {_gib(est.optimizer):>6} "
                f"{_gib(est.activations):>6} {_gib(est.total):>6} "
                f"{(f'{capacity:.0f}' if capacity else '-'):>6} "
                f"{'yes' if ok else ('-' if ok is None else 'NO')}"
            )
    if not as_json:
        typer.echo(
            "GiB per GPU; split: fsdp (FSDP2 shards the model), dp (data-parallel: the whole "
            "model on each GPU, trainable gradients all-reduced; qlora), one (one GPU); "
            "activations of one packed row at the shape's context with its "
            f"checkpointing setting; fits = total <= {FIT_HEADROOM:.0%} of the GPU. "
            "Estimates: only tiny-2k-cpu2 has been run."
        )


def _job_settings(job: JobFile, nproc: int | None) -> dict[str, Any]:
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
    }


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
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides")
    ] = None,
) -> None:
    """Parameters and memory per GPU of a job: full / LoRA / QLoRA, with and without
    activation checkpointing (the job's own setting marked *)."""
    try:
        job = load_job(config, overrides or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if not as_json:
        from vlmtune.cli.train import report_resolved

        report_resolved(job, typer.echo)
    settings = _job_settings(job, nproc)
    gpu_type = _gpu_type(job)
    dims = dims_for(job.job.model)
    rows = []
    for mode in MODES:
        # A qlora job replicates because of qlora; the other modes' rows show FSDP2.
        qlora_only = job.finetune_mode == "qlora" and mode != "qlora"
        row = {**settings, "replicate": settings["replicate"] and not qlora_only}
        for ac in (False, True):
            est = estimate_memory(dims, mode=mode, activation_checkpointing=ac, **row)
            own = mode == job.finetune_mode and ac == job.training.gradient_checkpointing
            rows.append((mode, ac, own, est, fits(est, gpu_type)))
    if as_json:
        out = {"model": job.job.model, "gpu_type": gpu_type, **settings, "estimates": []}
        for mode, ac, own, est, ok in rows:
            row = {"mode": mode, "activation_checkpointing": ac, "job": own, "fits": ok}
            out["estimates"].append({**row, "bytes_per_gpu": est.as_dict()})
        typer.echo(json.dumps(out))
        return
    own_est = next(r[3] for r in rows if r[2])
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


def register(app: typer.Typer) -> None:
    app.command("shapes")(shapes)
    app.command("plan")(plan)
