"""`vlmtune data ...` (validate, inline).

Thin: parse, call the data layer, print. Stdout carries only the result (one JSON
object with ``--json``); progress and errors go to stderr. Exit codes: 0 the file was
read (even with drops), 1 ``--strict`` and something was dropped, 2 bad arguments or
an unreadable file.
"""

from __future__ import annotations

import enum
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vlmtune.data.schema import RowKind
    from vlmtune.render import Renderer
    from vlmtune.render_rows import RenderLimits

app = typer.Typer(help="Validate, normalise and inline datasets.", no_args_is_help=True)


class Kind(enum.StrEnum):
    sft = "sft"
    preference = "preference"
    rl = "rl"


_ROW_KIND: dict[Kind, RowKind] = {Kind.sft: "sft", Kind.preference: "preference", Kind.rl: "rl"}


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _check_input(path: Path) -> None:
    if not path.exists():
        _fail(f"{path}: no such file")
    if not path.is_file():
        _fail(f"{path}: not a regular file")


@dataclass(frozen=True)
class _Check:
    """How `validate` reads (and, with a model, renders) rows: a job's settings or the flags'."""

    kind: RowKind
    cap: int | None  # the resolved per-message image cap; None: no cap
    image_root: Path | None = None
    model: str | None = None  # render every row with this model's tokenizer and processor
    configured_cap: int | None = None  # as written (None: the family's, 0: no cap)
    min_pixels: int | None = None
    max_pixels: int | None = None
    limits: RenderLimits | None = None


def _check_from_job(config: Path) -> tuple[_Check, Path]:
    """The job's exact settings, and its training data (``job.data``)."""
    from vlmtune.config import ConfigError, load_job
    from vlmtune.defaults import image_cap
    from vlmtune.render_rows import METHOD_KIND, RenderLimits

    try:
        job = load_job(config)
    except ConfigError as exc:
        _fail(str(exc))
    m = job.model
    check = _Check(
        kind=METHOD_KIND[job.algorithm.method],
        cap=image_cap(job.job.model, m.max_images_per_message),
        image_root=Path(job.job.image_root) if job.job.image_root else None,
        model=job.job.model,
        configured_cap=m.max_images_per_message,
        min_pixels=m.min_pixels,
        max_pixels=m.max_pixels,
        limits=RenderLimits.for_job(job),
    )
    return check, Path(job.job.data)


def _check_from_flags(
    kind: Kind | None, model: str | None, max_images: int | None, image_root: Path | None
) -> _Check:
    """Flags alone: with --model, rows also render as a job with default settings would."""
    from vlmtune.config import HyperparametersConfig, RLConfig
    from vlmtune.defaults import QWEN3_VL_MAX_IMAGES_PER_MESSAGE, image_cap
    from vlmtune.render_rows import RenderLimits

    kind_value = _ROW_KIND[kind or Kind.sft]
    if model is None:
        cap = QWEN3_VL_MAX_IMAGES_PER_MESSAGE if max_images is None else image_cap("", max_images)
        return _Check(kind_value, cap, image_root)
    from vlmtune.models.registry import get_model_spec

    try:
        get_model_spec(model)  # an unknown name is a typo, not "no cap"
    except (KeyError, ValueError, OSError) as exc:
        detail = str(exc.args[0]) if exc.args else "unknown model"
        _fail(f"--model {model!r}: {detail}")
    hp, rl = HyperparametersConfig(), RLConfig()  # a job file's defaults
    max_tokens = rl.max_tokens if kind_value == "rl" else 0
    limits = RenderLimits(hp.sequence_length, hp.train_on, max_tokens)
    cap = image_cap(model, max_images)
    return _Check(kind_value, cap, image_root, model, max_images, limits=limits)


def _renderer(check: _Check, required: bool) -> Renderer | None:
    """The renderer training would build (processor files only, no weights); None, with a
    note, when the model's files are not here and the job file did not ask for them."""
    from vlmtune.render_rows import build_renderer

    assert check.model is not None
    try:
        return build_renderer(
            check.model,
            min_pixels=check.min_pixels,
            max_pixels=check.max_pixels,
            max_images_per_message=check.configured_cap,
        )
    except (OSError, KeyError, ValueError) as exc:  # not downloaded, unreadable, unknown
        detail = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        if required:
            _fail(f"job.model {check.model!r}: {detail}")
        typer.echo(
            f"note: rows not rendered (no token-length, aspect-ratio or control-token "
            f"checks): {detail}",
            err=True,
        )
        return None


class _Progress:
    """A throttled 'N rows' line on stderr, only when a person is watching."""

    def __init__(self, label: str) -> None:
        self.enabled = sys.stderr.isatty()
        self.label = label
        self.last = time.monotonic()

    def update(self, rows: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            sys.stderr.write(f"\r{self.label}: {rows:,} rows")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@app.command()
def validate(
    path: Annotated[
        Path | None,
        typer.Argument(metavar="[PATH]", help="JSONL dataset (with --config: default job.data)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Job TOML: check as `vlmtune train` will, with its model, image cap, pixel "
            "limits, sequence_length, train_on and method; every row is rendered.",
        ),
    ] = None,
    kind: Annotated[Kind | None, typer.Option(help="Row kind (default sft).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model: its family's image cap, and rows rendered with its tokenizer at a "
            "default job's settings (when its files are here)."
        ),
    ] = None,
    max_images_per_message: Annotated[
        int | None,
        typer.Option(
            min=0, help="Images kept per message, 0: no cap (default: the model family's, or 1)."
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Allow local images under this directory (instead of the file's)."),
    ] = None,
    max_image_pixels: Annotated[
        int | None, typer.Option(min=1, help="Decompression-bomb limit (default 64M).")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any row is dropped.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
) -> None:
    """Check every row exactly as training will read it (and, with --config or --model,
    render it): the rows it drops are the rows training drops."""
    from vlmtune.data.images import DEFAULT_MAX_PIXELS
    from vlmtune.data.report import ValidationReport
    from vlmtune.data.validate import iter_dataset
    from vlmtune.render_rows import iter_rendered

    if config is not None:
        flags: dict[str, object] = {"--kind": kind, "--model": model, "--image-root": image_root}
        flags["--max-images-per-message"] = max_images_per_message
        clashes = [name for name, value in flags.items() if value is not None]
        if clashes:
            _fail(f"{', '.join(clashes)}: --config takes these from the job file ({config})")
        check, job_data = _check_from_job(config)
        path = path or job_data
    elif path is None:
        _fail("give a dataset PATH, or --config JOB.toml")
    else:
        check = _check_from_flags(kind, model, max_images_per_message, image_root)
    _check_input(path)
    if check.image_root is not None and not check.image_root.is_dir():
        _fail(f"image root {check.image_root}: not a directory")
    renderer = _renderer(check, required=config is not None) if check.model else None
    report = ValidationReport(path=str(path), kind=check.kind)
    progress = _Progress(f"validating {path}")
    try:
        rows = iter_dataset(
            path,
            check.kind,
            max_images_per_message=check.cap,
            image_root=check.image_root,
            max_image_pixels=max_image_pixels or DEFAULT_MAX_PIXELS,
            report=report,
        )
        checked: Iterator[object] = rows
        if renderer is not None and check.limits is not None:
            checked = iter_rendered(rows, renderer, check.limits, report)
        for _ in checked:  # rows are checked and discarded: bounded memory
            progress.update(report.total)
    except OSError as exc:
        progress.done()
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    progress.done()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        typer.echo(report.summary_text())
    if strict and report.dropped:
        raise typer.Exit(1)


@app.command()
def inline(
    in_path: Annotated[Path, typer.Argument(metavar="IN", help="JSONL dataset to read.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="JSONL file to write.")],
    kind: Annotated[Kind | None, typer.Option(help="Row kind (default: look everywhere).")] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Allow local images under this directory (instead of IN's)."),
    ] = None,
    allow_private_network: Annotated[
        bool,
        typer.Option(
            "--allow-private-network",
            help="Allow hosts on loopback/private/link-local addresses (off: SSRF guard).",
        ),
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any row failed.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
) -> None:
    """Download / read every image reference and rewrite it as a base64 data URL."""
    from vlmtune.data.inline import inline_dataset

    _check_input(in_path)
    if not out_path.parent.is_dir():
        _fail(f"{out_path.parent}: no such directory for OUT")
    if image_root is not None and not image_root.is_dir():
        _fail(f"--image-root {image_root}: not a directory")
    progress = _Progress(f"inlining {in_path}")
    try:
        report = inline_dataset(
            in_path,
            out_path,
            kind=kind.value if kind is not None else None,
            image_root=image_root,
            allow_private_network=allow_private_network,
            progress=lambda r: progress.update(r.total),
        )
    except OSError as exc:
        progress.done()
        _fail(f"cannot inline {in_path} -> {out_path}: {exc.strerror or exc}")
    progress.done()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        typer.echo(report.summary_text())
    if strict and report.failed:
        raise typer.Exit(1)
