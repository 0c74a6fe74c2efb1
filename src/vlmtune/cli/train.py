"""`vlmtune train`, `vlmtune eval`, `vlmtune export`: parse, call a recipe, print."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vlmtune.config import ConfigError, JobFile, load_job
from vlmtune.job_checks import check_compute, machine_problems


def _err(message: str) -> None:
    # sys.stderr as it is now, not click's wrapper of its buffer: while a progress bar
    # is live, rich stands in for sys.stderr and prints the line above the bar
    print(message, file=sys.stderr, flush=True)


def report_resolved(job: JobFile, say: Callable[[str], None]) -> None:
    """Print what load_job resolved from the hosted trainer's keys, as vision defaults are."""
    from vlmtune.defaults import resolved_lines

    for line in resolved_lines(job):
        say(line)


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
        problems = check_compute(job, nproc, download=not dry_run, machine=not dry_run)
        if problems:
            raise ConfigError(str(config), problems)
    except ConfigError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    from vlmtune.engine.distributed import already_launched
    from vlmtune.recipes.common import is_main_process

    if dry_run:  # no recipe runs, which would print these (recipes.common.prepare)
        report_resolved(job, _err)
        for problem in machine_problems(job, nproc):
            _err(f"on this machine, training would stop here: {problem}")
    procs = nproc or job.compute.gpu_count
    if not already_launched() and (procs > 1 or job.compute.nodes > 1 or dry_run):
        raise typer.Exit(
            _launch(job, config, type_, output, resume, overrides or [], procs, dry_run)
        )
    # Under torchrun every rank runs what follows; rank 0 alone reports. The recipe
    # applies and prints the vision defaults (recipes.common.prepare), as from Python.
    say = _err if is_main_process() else (lambda message: None)
    run_dir = output or Path(job.job.output_dir) / (job.job.name or config.stem)
    import os
    import sys
    from functools import partial

    from vlmtune.atomic import WriteRefused
    from vlmtune.cli.train_stops import EXIT_INTERRUPTED, STOPPED_PREFIX, interrupted_message
    from vlmtune.engine.distributed import ENV_LAUNCHED
    from vlmtune.engine.divergence import DivergedError
    from vlmtune.recipes import dpo, rl, sft
    from vlmtune.recipes.run_dir import ResumeError

    recipes: dict[str, Callable[..., dict[str, Any]]] = {
        "sft": sft.run,
        "dpo": dpo.run,
        "rl": partial(rl.run, config_dir=config.parent),
    }
    try:
        summary = recipes[type_](job, run_dir, resume=resume, log=say)
    except (ConfigError, ResumeError) as e:  # found by a recipe before any training
        say(str(e))
        raise typer.Exit(2) from None
    except (DivergedError, WriteRefused) as e:  # the job was right; the run went wrong
        say(f"{STOPPED_PREFIX}{e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # Under our own torchrun, the `vlmtune train` that launched it reports (_launch).
        if not os.environ.get(ENV_LAUNCHED):
            say(interrupted_message(run_dir, sys.argv))
        raise typer.Exit(EXIT_INTERRUPTED) from None
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
    try:
        return launch.run(plan)
    except KeyboardInterrupt:
        import sys

        from vlmtune.cli.train_stops import EXIT_INTERRUPTED, interrupted_message

        run_dir = output or Path(job.job.output_dir) / (job.job.name or config.stem)
        _err(interrupted_message(run_dir, sys.argv))
        return EXIT_INTERRUPTED


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
