"""`vlmtune train`, `vlmtune eval`, `vlmtune export`: parse, call a recipe, print."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vlmtune.cli.job_checks import data_file_problems, lora_target_problems
from vlmtune.config import ConfigError, JobFile, load_job

if TYPE_CHECKING:
    from vlmtune.models.registry import ModelSpec


def _err(message: str) -> None:
    typer.echo(message, err=True)


def report_resolved(job: JobFile, say: Callable[[str], None]) -> None:
    """Print what load_job resolved from the hosted trainer's keys, as vision defaults are."""
    from vlmtune.defaults import resolved_lines

    for line in resolved_lines(job):
        say(line)


def _check_model(job: JobFile) -> tuple[ModelSpec | None, list[str], bool]:
    """(the model's spec if known, its problems, whether it still has to be downloaded).

    Resolves ``job.model`` as training will, without downloading: an unknown name, a
    missing directory or, with HF_HUB_OFFLINE=1, an uncached hub id is refused here.
    """
    from vlmtune.models.loading import (
        ModelNotCachedError,
        ModelNotFoundError,
        hub_repo_id,
        resolve_model_path,
    )
    from vlmtune.models.registry import get_model_spec, spec_from_dir

    model, revision = job.job.model, job.job.revision
    if revision is not None and hub_repo_id(model) is None:
        problem = (
            f"job.revision: {revision!r} pins a Hugging Face hub id, and job.model = {model!r} "
            "is a local model (remove job.revision)"
        )
        return None, [problem], False
    try:
        path = resolve_model_path(model, revision=revision)
    except ModelNotCachedError:  # a hub id: `vlmtune train` downloads it after the checks
        path = None
    except (ModelNotFoundError, ValueError) as e:
        return None, [f"job.model: {e}"], False
    try:
        return get_model_spec(model), [], path is None
    except (KeyError, ValueError):
        pass
    if path is None or (path / "adapter_config.json").is_file():
        return None, [], path is None  # an adapter's base is resolved when it loads
    if not (path / "config.json").is_file():
        return None, [f"job.model: {path} has no config.json (nor adapter_config.json)"], False
    try:
        return spec_from_dir(path), [], False
    except (KeyError, ValueError) as e:
        return None, [f"job.model: {e}"], False


def _check_compute(
    job: JobFile,
    procs_per_node: int | None = None,
    *,
    download: bool = False,
    machine: bool = True,
) -> list[str]:
    """Problems the machine or the model family rules out, found before any work.

    ``procs_per_node``: ``--nproc`` (default: ``[compute] gpu_count``, or torchrun's
    LOCAL_WORLD_SIZE inside a launched process). ``download``: fetch a hub model missing
    from the cache once everything else checks out, so that the processes torchrun
    starts find it cached (a ``--dry-run`` does not). ``machine``: include what this
    machine lacks (``_machine_problems``).
    """
    spec, problems, pending_download = _check_model(job)
    if machine:
        problems += _machine_problems(job, procs_per_node)
    per_node = _procs_per_node(job, procs_per_node)
    if spec is not None and spec.min_gpus > per_node * job.compute.nodes:
        problems.append(
            f"job.model: {spec.name} needs at least {spec.min_gpus} GPUs; compute asks for "
            f"{per_node * job.compute.nodes}"
        )
    for key in ("data", "validation_data"):
        problems += data_file_problems(f"job.{key}", getattr(job.job, key))
    if job.finetune_mode != "full" and not problems:
        problems += lora_target_problems(job)
    if download and pending_download and not problems:
        from vlmtune.models.loading import ModelNotFoundError, resolve_model_path

        try:
            resolve_model_path(job.job.model, revision=job.job.revision, download=True)
        except (ModelNotFoundError, ValueError) as e:
            problems.append(f"job.model: {e}")
    return problems


def _procs_per_node(job: JobFile, procs_per_node: int | None) -> int:
    """``--nproc``, else torchrun's LOCAL_WORLD_SIZE inside a launched process, else gpu_count."""
    import os

    from vlmtune.cli.launch import already_launched

    if procs_per_node is not None:
        return procs_per_node
    if already_launched():
        return int(os.environ.get("LOCAL_WORLD_SIZE", job.compute.gpu_count))
    return job.compute.gpu_count


def _machine_problems(job: JobFile, procs_per_node: int | None) -> list[str]:
    """What this machine lacks for the job (GPUs, CUDA, packages).

    Kept apart from the job's own problems so that ``--dry-run`` and ``vlmtune plan``
    show a GPU job's plan on a laptop, listing these as notes instead of refusing.
    """
    import importlib.util

    import torch

    from vlmtune.cli.launch import already_launched

    problems: list[str] = []
    c = job.compute
    launched = already_launched()
    per_node = _procs_per_node(job, procs_per_node)
    on_cpu = c.gpu_type == "cpu" or job.training.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and c.gpu_count > 1 and c.gpu_type != "cpu" and procs_per_node is None:
        if not launched:
            problems.append(
                f"compute.gpu_count: {c.gpu_count} GPUs per node asked for, but this machine has "
                "no CUDA GPU (or training.device is cpu); pass --nproc N to train on N CPU "
                "processes, or set gpu_count = 1"
            )
    elif not on_cpu and per_node > torch.cuda.device_count():
        problems.append(
            f"compute.gpu_count: {per_node} processes per node need as many GPUs; this machine "
            f"has {torch.cuda.device_count()}"
        )
    if job.algorithm.variety == "qlora":
        if not torch.cuda.is_available():
            problems.append(
                "algorithm.variety: qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and "
                "this machine has none; `vlmtune plan` shows the plan here, and "
                'training.use_qlora = false (or variety = "lora") trains LoRA on the CPU'
            )
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                "algorithm.variety: qlora needs the bitsandbytes package "
                "(pip install 'vlmtune[qlora]')"
            )
    if job.training.attention == "flash_attention_2":
        if on_cpu:
            problems.append("training.attention: flash_attention_2 needs a CUDA GPU; use sdpa")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "training.attention: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation), or use sdpa"
            )
    if c.cpu_offload and on_cpu:
        problems.append(
            "compute.cpu_offload: offloads GPU memory to the host; on the CPU everything is "
            "already in host memory (remove it, or set it only on a machine with CUDA GPUs)"
        )
    return problems


def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML job file")],
    type_: Annotated[str, typer.Option("--type", help="sft, dpo or rl")] = "sft",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc", min=1, help="processes per node under torchrun (default: compute.gpu_count)"
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the torchrun command(s) and stop")
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides")
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="submit the job to a `vlmtune serve` URL")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="VLMTUNE_API_KEY", help="key for --server")
    ] = None,
    poll: Annotated[bool, typer.Option(help="with --server: stream events until it ends")] = False,
) -> None:
    """Train from a TOML job file (vision defaults are applied and printed)."""
    if server is not None:
        from vlmtune.cli.serve import submit_job

        raise typer.Exit(submit_job(config, type_, server, api_key, overrides or [], poll))
    if type_ not in ("sft", "dpo", "rl"):
        _err(f"--type: {type_!r} is not one of sft, dpo, rl")
        raise typer.Exit(2)
    try:
        job = load_job(config, overrides or [], method=type_)
        problems = _check_compute(job, nproc, download=not dry_run, machine=not dry_run)
        if problems:
            raise ConfigError(str(config), problems)
    except ConfigError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    from vlmtune.cli import launch
    from vlmtune.recipes.common import is_main_process

    if dry_run:  # no recipe runs, which would print these (recipes.common.prepare)
        report_resolved(job, _err)
        for problem in _machine_problems(job, nproc):
            _err(f"on this machine, training would stop here: {problem}")
    procs = nproc or job.compute.gpu_count
    if not launch.already_launched() and (procs > 1 or job.compute.nodes > 1 or dry_run):
        raise typer.Exit(
            _launch(job, config, type_, output, resume, overrides or [], procs, dry_run)
        )
    # Under torchrun every rank runs what follows; rank 0 alone reports. The recipe
    # applies and prints the vision defaults (recipes.common.prepare), as from Python.
    say = _err if is_main_process() else (lambda message: None)
    run_dir = output or Path(job.job.output_dir) / (job.job.name or config.stem)
    from functools import partial

    from vlmtune.engine.divergence import DivergedError
    from vlmtune.recipes import dpo, rl, sft

    recipes: dict[str, Callable[..., dict[str, Any]]] = {
        "sft": sft.run,
        "dpo": dpo.run,
        "rl": partial(rl.run, config_dir=config.parent),
    }
    try:
        summary = recipes[type_](job, run_dir, resume=resume, log=say)
    except ConfigError as e:  # found by a recipe before any training (e.g. an unknown reward)
        _err(str(e))
        raise typer.Exit(2) from None
    except DivergedError as e:  # a training failure, not a config error: exit 1
        say(f"training stopped: {e}")
        raise typer.Exit(1) from None
    if is_main_process():
        typer.echo(json.dumps(summary))


def _launch(
    job: JobFile,
    config: Path,
    type_: str,
    output: Path | None,
    resume: bool,
    overrides: list[str],
    procs: int,
    dry_run: bool,
) -> int:
    """Start torchrun on this node (or, with --dry-run, only print the command(s))."""
    import shlex

    from vlmtune.cli import launch

    child = launch.train_child_args(config, type_, output, resume, overrides)
    plan = launch.make_plan(procs, job.compute.nodes, child, job.job.name or config.stem)
    if plan.nodes > 1:
        _err(f"{plan.nodes} nodes x {procs} processes; run this on each node:")
        for rank in range(plan.nodes):
            _err(f"  node {rank}: {plan.shell_line(rank)}")
    elif procs > 1:
        _err(f"launching {procs} processes: {shlex.join(plan.command())}")
    else:
        _err("one process: nothing to launch (vlmtune train runs in this process)")
    if dry_run:
        return 0
    if plan.nodes > 1:
        _err("starting node 0 here")
    return launch.run(plan)


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
    server: Annotated[
        str | None, typer.Option(help="evaluate a model served by `vlmtune serve`")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="VLMTUNE_API_KEY", help="key for --server")
    ] = None,
) -> None:
    """Greedy exact-match accuracy (whitespace and case normalised)."""
    from vlmtune.data import SFTRow, load_dataset
    from vlmtune.defaults import image_cap
    from vlmtune.evaluation import evaluate_exact_match
    from vlmtune.sdk import ServiceClient

    if not data.is_file():
        _err(f"--data: {data} does not exist")
        raise typer.Exit(2)
    # The model family's image cap, as in training: the rows evaluated are the ones trained.
    cap = image_cap(model, None)
    loaded, report = load_dataset(data, "sft", max_images_per_message=cap)
    if report.dropped:
        _err(f"{data}: {len(report.dropped)} row(s) dropped (see `vlmtune data validate {data}`)")
    rows = [r for r in loaded if isinstance(r, SFTRow)]  # kind "sft" reads only SFT rows
    rows = rows[:max_examples] if max_examples else rows
    if server is not None:
        from vlmtune.evaluation import evaluate_exact_match_remote

        result = evaluate_exact_match_remote(
            server, api_key, model, rows, max_new_tokens=max_new_tokens
        )
    else:
        sampler = ServiceClient().create_sampling_client(
            model, min_pixels=min_pixels, max_pixels=max_pixels
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
    from vlmtune.models.saving import merge_adapter_to_dir

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
    typer.run(train)  # exits with the command's status
