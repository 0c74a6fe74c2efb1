"""`vlmtune collect` and `vlmtune filter`: an agent's own traces into training data.

Thin: parse, call ``vlmtune.traces``, print. Stdout carries the result (one JSON object
with ``--json``); errors go to stderr. Exit codes: 0 done (episodes that failed are in
the summary, not an exit code), 2 bad arguments (unknown task, bad policy, no store),
1 the store could not be written.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from vlmtune.tasks.protocol import TaskClient


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Target(enum.StrEnum):
    sft = "sft"
    preference = "preference"
    rl = "rl"


class Relabel(enum.StrEnum):
    none = "none"
    expert = "expert"


class Pairs(enum.StrEnum):
    return_ = "return"
    expert = "expert"


def _task_client(task: str, api_key: str | None) -> TaskClient:
    """A URL reaches a task app over HTTP; a name runs the registered task here."""
    from vlmtune.tasks.episodes import LocalTaskClient
    from vlmtune.tasks.http import HttpTaskClient
    from vlmtune.tasks.registry import UnknownTask

    if task.startswith(("http://", "https://")):
        return HttpTaskClient(task, api_key=api_key)
    try:
        return LocalTaskClient(task)
    except UnknownTask as exc:
        _fail(f"--task: {exc}")


def collect_command(
    task: Annotated[str, typer.Option(help="A task name (lamp, crafter) or a task app's URL.")],
    policy: Annotated[
        str,
        typer.Option(
            help="random, expert, openai:URL (an OpenAI-compatible endpoint; with --model), "
            "or a local model directory or name (e.g. tiny-qwen3-vl), sampled here in batches."
        ),
    ],
    store: Annotated[Path, typer.Option(help="The SQLite trace store (created if missing).")],
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to run.")] = 16,
    concurrency: Annotated[int, typer.Option(min=1, help="Episodes at once.")] = 4,
    split: Annotated[str, typer.Option(help="The task's seed split.")] = "train",
    seed_start: Annotated[int, typer.Option(min=0, help="The first episode's seed.")] = 0,
    image_only: Annotated[
        bool, typer.Option("--image-only", help="Prompts carry the frame and no text.")
    ] = False,
    model: Annotated[
        str | None, typer.Option(help="openai:URL: the model name the endpoint serves.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="openai:URL: sent as Authorization: Bearer KEY.")
    ] = None,
    task_api_key: Annotated[str | None, typer.Option(help="A task app URL: its API key.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Model policies: tokens per answer.")] = 32,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Model policies: sampling temperature (0: greedy).")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object.")
    ] = False,
) -> None:
    """Run a policy on a task for N episodes and store every step."""
    from vlmtune.tasks.protocol import TaskError
    from vlmtune.traces.collect import CollectConfig, collect
    from vlmtune.traces.policies import PolicySpecError, make_policy
    from vlmtune.traces.store import TraceStore, TraceStoreError

    if not store.parent.is_dir():
        _fail(f"--store {store}: no such directory {store.parent}")
    client = _task_client(task, task_api_key)
    try:
        info = client.info()
    except TaskError as exc:
        _fail(f"--task {task}: {exc}")
    if split not in info.splits:
        _fail(f"--split {split!r}: task {info.name!r} has splits {', '.join(info.splits)}")
    if policy == "expert" and not info.has_expert:
        _fail(f"--policy expert: task {info.name!r} has no expert")
    try:
        chosen = make_policy(
            policy,
            model=model,
            api_key=api_key,
            temperature=temperature,
            max_tokens=max_tokens,
            max_batch=concurrency,
        )
    except PolicySpecError as exc:
        _fail(str(exc))
    config = CollectConfig(episodes, concurrency, split, seed_start, image_only)
    try:
        with TraceStore(store) as traces:
            summary = collect(client, chosen, traces, config)
    except TraceStoreError as exc:
        _fail(str(exc), code=1)
    except TaskError as exc:
        _fail(f"--task {task}: {exc}")
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the steps taken so far are in {store}", err=True)
        raise typer.Exit(130) from None
    finally:
        chosen.close()
    typer.echo(json.dumps(summary.to_dict()) if as_json else summary.text())


def filter_command(
    store: Annotated[Path, typer.Option(help="The trace store to read.")],
    to: Annotated[Target, typer.Option(help="The row kind to write.")],
    output: Annotated[Path, typer.Option(help="The JSONL file to write (train rows).")],
    validation_output: Annotated[
        Path | None, typer.Option(help="Where the held-out episodes' rows go.")
    ] = None,
    validation_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Share of episodes held out (default 0.1 with --validation-output).",
        ),
    ] = None,
    relabel: Annotated[
        Relabel, typer.Option(help="sft: answer with the expert's action (DAgger).")
    ] = Relabel.none,
    pairs: Annotated[
        Pairs,
        typer.Option(
            help="preference: 'return' (same observation, higher return-to-go wins) or "
            "'expert' (the expert's action over the policy's)."
        ),
    ] = Pairs.return_,
    min_return: Annotated[
        float | None, typer.Option(help="Keep episodes returning >= this.")
    ] = None,
    min_achievements: Annotated[
        int | None, typer.Option(min=0, help="Keep episodes with >= this many achievements.")
    ] = None,
    success_only: Annotated[
        bool, typer.Option("--success-only", help="Keep successful episodes only.")
    ] = False,
    policy: Annotated[
        list[str] | None, typer.Option(help="Keep this policy's episodes (repeatable).")
    ] = None,
    split: Annotated[list[str] | None, typer.Option(help="Keep this split (repeatable).")] = None,
    task: Annotated[list[str] | None, typer.Option(help="Keep this task (repeatable).")] = None,
    valid_only: Annotated[
        bool, typer.Option("--valid-only", help="Keep steps whose action was valid.")
    ] = False,
    dedupe: Annotated[
        bool, typer.Option("--dedupe/--no-dedupe", help="Drop identical (prompt, answer) rows.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seeds the train/validation split.")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
) -> None:
    """Turn stored traces into SFT, preference or RL JSONL that `vlmtune train` reads."""
    from vlmtune.traces.filter import FilterOptions, filter_traces, write_rows
    from vlmtune.traces.store import TraceStore, TraceStoreError

    if not store.is_file():
        _fail(f"--store {store}: no such file")
    for flag, path in (("--output", output), ("--validation-output", validation_output)):
        if path is not None and not path.parent.is_dir():
            _fail(f"{flag} {path}: no such directory {path.parent}")
    if validation_fraction and validation_output is None:
        _fail("--validation-fraction needs --validation-output (where those rows go)")
    if validation_output is not None and validation_fraction is None:
        validation_fraction = 0.1
    if relabel is Relabel.expert and to is not Target.sft:
        _fail("--relabel expert applies to --to sft")
    options = FilterOptions(
        to=to.value,
        relabel=relabel.value,
        pairs=pairs.value,
        min_return=min_return,
        min_achievements=min_achievements,
        success_only=success_only,
        policies=policy or [],
        splits=split or [],
        tasks=task or [],
        valid_only=valid_only,
        dedupe=dedupe,
        validation_fraction=validation_fraction or 0.0,
        seed=seed,
    )
    try:
        with TraceStore(store) as traces:
            result = filter_traces(traces, options, output.parent)
    except TraceStoreError as exc:
        _fail(str(exc))
    write_rows(output, result.train)
    if validation_output is not None:
        write_rows(validation_output, result.validation)
    report = result.report
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(report.text())
        typer.echo(f"wrote {output}" + (f" and {validation_output}" if validation_output else ""))


def register(app: typer.Typer) -> None:
    app.command("collect")(collect_command)
    app.command("filter")(filter_command)
