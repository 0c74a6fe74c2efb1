"""`vlmtune train`, `vlmtune eval`, `vlmtune export`: parse, call a recipe, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vlmtune.config import ConfigError, JobFile, load_job


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _check_compute(job: JobFile) -> list[str]:
    """Problems the machine or the model family rules out, found before any work."""
    import torch

    from vlmtune.models.registry import get_model_spec

    problems = []
    c = job.compute
    try:
        spec = get_model_spec(job.job.model)
    except (KeyError, ValueError) as e:
        spec = None
        if not Path(job.job.model).exists():
            problems.append(f"job.model: {e}")
    if c.gpu_count > 1 or c.nodes > 1:
        problems.append(
            f"compute.gpu_count/nodes: {c.gpu_count} GPU(s) x {c.nodes} node(s) asked for, but this "
            "version trains on one device; set gpu_count = 1 and nodes = 1"
        )
    if spec is not None and spec.min_gpus > c.gpu_count * c.nodes:
        problems.append(
            f"job.model: {spec.name} needs at least {spec.min_gpus} GPUs; compute asks for {c.gpu_count * c.nodes}"
        )
    if job.algorithm.variety == "qlora" and not torch.cuda.is_available():
        problems.append(
            'algorithm.variety: qlora needs a CUDA GPU (bitsandbytes 4-bit); use "lora" on the CPU'
        )
    for key in ("data", "validation_data"):
        value = getattr(job.job, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"job.{key}: {value} does not exist")
    return problems


def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML job file")],
    type_: Annotated[str, typer.Option("--type", help="sft, dpo or rl")] = "sft",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides")
    ] = None,
) -> None:
    """Train from a TOML job file (vision defaults are applied and printed)."""
    import torch

    from vlmtune.defaults import apply_vision_defaults
    from vlmtune.models.registry import get_model_spec

    if type_ not in ("sft", "dpo", "rl"):
        _err(f"--type: {type_!r} is not one of sft, dpo, rl")
        raise typer.Exit(2)
    try:
        job = load_job(config, overrides or [], method=type_)
        problems = _check_compute(job)
        if problems:
            raise ConfigError(str(config), problems)
    except ConfigError as e:
        _err(str(e))
        raise typer.Exit(2) from None

    device_type = "cuda" if job.training.device != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        supports_vision = get_model_spec(job.job.model).supports_vision
    except (KeyError, ValueError):
        supports_vision = True
    bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
    changes = apply_vision_defaults(
        job, supports_vision=supports_vision, device_type=device_type, bf16_ok=bf16_ok
    )
    for change in changes:
        _err(f"vision default: {change}")

    run_dir = output or Path(job.job.output_dir) / (job.job.name or config.stem)
    _err(f"run directory: {run_dir}")
    from vlmtune.recipes import sft

    recipes = {"sft": sft.run}
    if type_ not in recipes:
        _err(f"--type {type_}: this version ships the sft recipe only")
        raise typer.Exit(2)
    summary = recipes[type_](job, run_dir, resume=resume, log=_err)
    typer.echo(json.dumps(summary))


def eval_cmd(
    model: Annotated[str, typer.Option("--model", help="model directory (full or adapter) or id")],
    data: Annotated[
        Path, typer.Option("--data", help="SFT-format JSONL; the last assistant turn is the answer")
    ],
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    predictions: Annotated[
        Path | None, typer.Option(help="write per-row predictions (JSONL)")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="evaluate the first N rows")] = None,
    min_pixels: Annotated[
        int | None, typer.Option(help="override the processor's min pixels")
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="override the processor's max pixels")
    ] = None,
) -> None:
    """Greedy exact-match accuracy (whitespace and case normalised)."""
    from vlmtune.data import load_dataset
    from vlmtune.evaluation import evaluate_exact_match
    from vlmtune.sdk import ServiceClient

    if not data.is_file():
        _err(f"--data: {data} does not exist")
        raise typer.Exit(2)
    rows, report = load_dataset(data, "sft", max_images_per_message=None)
    if report.dropped:
        _err(f"{data}: {len(report.dropped)} row(s) dropped (see `vlmtune data validate {data}`)")
    rows = rows[:max_examples] if max_examples else rows
    sampler = ServiceClient().create_sampling_client(
        model, min_pixels=min_pixels, max_pixels=max_pixels, max_images_per_message=None
    )
    result = evaluate_exact_match(sampler, rows, max_new_tokens=max_new_tokens)
    if predictions is not None:
        predictions.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    if as_json:
        typer.echo(json.dumps({"accuracy": result.accuracy, "n": result.n}))
    else:
        typer.echo(
            f"exact-match accuracy: {result.accuracy:.4f} ({round(result.accuracy * result.n)}/{result.n})"
        )


def export(
    source: Annotated[Path, typer.Argument(help="a run's final/ directory (LoRA adapter)")],
    merge: Annotated[Path, typer.Option("--merge", help="write the merged full model here")],
) -> None:
    """Fold a LoRA adapter into its base: a plain model directory with processor files."""
    from vlmtune.models.loading import merge_adapter_to_dir

    if not (source / "adapter_config.json").exists():
        _err(f"{source}: no adapter_config.json; it is already a full model (nothing to merge)")
        raise typer.Exit(2)
    out = merge_adapter_to_dir(source, merge)
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(eval_cmd)
    app.command("export")(export)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(typer.run(train))
