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
from pathlib import Path
from typing import Annotated, NoReturn

import typer

app = typer.Typer(help="Validate, normalise and inline datasets.", no_args_is_help=True)

DEFAULT_MAX_IMAGES_PER_MESSAGE = 1  # Qwen3-VL's cap, the first supported family


class Kind(enum.StrEnum):
    sft = "sft"
    preference = "preference"
    rl = "rl"


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _check_input(path: Path) -> None:
    if not path.exists():
        _fail(f"{path}: no such file")
    if not path.is_file():
        _fail(f"{path}: not a regular file")


def _image_cap(model: str | None, max_images: int | None) -> int | None:
    """The per-message image cap: the flag, else the model family's, else Qwen3-VL's 1."""
    if max_images is not None:
        return max_images
    if model is None:
        return DEFAULT_MAX_IMAGES_PER_MESSAGE
    try:
        # Imported here: the data layer knows nothing of models, and `validate` without
        # --model must not pay for (or depend on) the model registry.
        from vlmtune.models.registry import get_model_spec
    except ImportError as exc:
        _fail(f"--model needs the model registry, which could not be imported ({exc})")
    try:
        cap = get_model_spec(model).max_images_per_message
    except (KeyError, ValueError) as exc:
        detail = str(exc.args[0]) if exc.args else "unknown model"
        _fail(f"--model {model!r}: {detail}")
    return None if cap is None else int(cap)  # None: the family has no cap


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
    path: Annotated[Path, typer.Argument(metavar="PATH", help="JSONL dataset.")],
    kind: Annotated[Kind, typer.Option(help="Row kind.")] = Kind.sft,
    model: Annotated[
        str | None, typer.Option(help="Model; its family sets the per-message image cap.")
    ] = None,
    max_images_per_message: Annotated[
        int | None,
        typer.Option(min=0, help="Images kept per message (overrides --model). Default 1."),
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
    """Check every row (schema, images, limits) exactly as training will read it."""
    from vlmtune.data.images import DEFAULT_MAX_PIXELS
    from vlmtune.data.report import ValidationReport
    from vlmtune.data.validate import iter_dataset

    cap = _image_cap(model, max_images_per_message)
    _check_input(path)
    if image_root is not None and not image_root.is_dir():
        _fail(f"--image-root {image_root}: not a directory")
    report = ValidationReport(path=str(path), kind=kind.value)
    progress = _Progress(f"validating {path}")
    try:
        rows = iter_dataset(
            path,
            kind.value,
            max_images_per_message=cap,
            image_root=image_root,
            max_image_pixels=max_image_pixels or DEFAULT_MAX_PIXELS,
            report=report,
        )
        for _ in rows:  # rows are checked and discarded: bounded memory
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
