"""The one loader that ``vlmtune data validate`` and training both use.

It streams: one line is read, parsed and checked at a time, so validating a file of
any size holds one row in memory, and no line longer than ``lines.MAX_LINE_BYTES`` is
held at all (a dataset written as one JSON array). Every problem with a row becomes a
dropped row with a reason in the report, never an exception; only an unreadable file
raises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vlmtune.data.errors import RowError
from vlmtune.data.images import DEFAULT_MAX_PIXELS
from vlmtune.data.lines import read_lines
from vlmtune.data.refs import RefContext
from vlmtune.data.report import ValidationReport
from vlmtune.data.rows import KINDS, RowParser
from vlmtune.data.schema import Row, RowKind

log = logging.getLogger("vlmtune.data")


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def iter_dataset(
    path: str | Path,
    kind: RowKind = "sft",
    *,
    max_images_per_message: int | None = 1,
    image_root: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    report: ValidationReport | None = None,
) -> Iterator[Row]:
    """Yield the valid rows of a JSONL file, recording drops and warnings in ``report``.

    The file is opened now (so a missing file raises ``OSError`` here, not at the first
    ``next``); rows are read lazily. Pass a ``ValidationReport`` to receive the counts,
    drops and warnings; without one they are logged to the ``vlmtune.data`` logger.
    ``max_images_per_message`` truncates extra images per message (a warning, and
    ``report.images_dropped``); ``None`` disables the cap. Training passes the resolved
    cap (``vlmtune.defaults.image_cap``: unset there means the model family's).
    """
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    parser = RowParser(
        kind,
        RefContext.for_dataset(path, image_root, max_image_pixels),
        max_images_per_message,
    )
    f = path.open("rb")  # raises FileNotFoundError / IsADirectoryError / PermissionError
    return _rows(f, parser, report)


def _rows(f: BinaryIO, parser: RowParser, report: ValidationReport | None) -> Iterator[Row]:
    def drop(line: int, reason: str, category: str) -> None:
        if report is not None:
            report.drop(line, reason, category)
        else:
            log.warning("line %d dropped: %s", line, reason)

    with f:
        for line in read_lines(f):
            line_no, raw = line.number, line.data.strip()
            if line.too_long:
                if report is not None:
                    report.total += 1
                drop(line_no, line.too_long_reason(), "line too long")
                continue
            if not raw:
                continue  # blank lines are layout, not rows
            if report is not None:
                report.total += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                drop(line_no, f"not valid UTF-8 (byte {exc.start})", "not valid UTF-8")
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # a BOM some editors write
            if text.startswith("["):  # a dataset as one array: parsed, 10-20x its size
                drop(line_no, "row is an array, not a JSON object", "not a JSON object")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                drop(line_no, f"not valid JSON: {exc.msg} (column {exc.colno})", "not valid JSON")
                continue
            except (RecursionError, ValueError) as exc:
                drop(line_no, f"not valid JSON: {exc}", "not valid JSON")
                continue
            if not isinstance(obj, dict):
                drop(line_no, f"row is {_json_type(obj)}, not a JSON object", "not a JSON object")
                continue
            try:
                parsed = parser.parse(obj, line_no)
            except RowError as exc:
                drop(line_no, str(exc), exc.category)
                continue
            except Exception as exc:  # a bug must cost one row, not the whole run
                log.debug("internal error on line %d", line_no, exc_info=True)
                drop(line_no, f"internal error: {type(exc).__name__}: {exc}", "internal error")
                continue
            if report is not None:
                report.valid += 1
                report.images += parsed.images
                report.images_dropped += parsed.images_dropped
                for message in parsed.warnings:
                    report.warn(line_no, message)
            else:
                for message in parsed.warnings:
                    log.warning("line %d: %s", line_no, message)
            yield parsed.row


def load_dataset(
    path: str | Path,
    kind: RowKind = "sft",
    *,
    max_images_per_message: int | None = 1,
    image_root: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    keep_rows: bool = True,
) -> tuple[list[Row], ValidationReport]:
    """Read and check a whole JSONL dataset: (valid rows, report).

    With ``keep_rows=False`` rows are checked and discarded as they stream by (the list
    comes back empty), which is what ``vlmtune data validate`` does so a file of any size
    validates in bounded memory. Raises ``OSError`` only if the file cannot be opened.
    """
    report = ValidationReport(path=str(path), kind=kind)
    rows_iter = iter_dataset(
        path,
        kind,
        max_images_per_message=max_images_per_message,
        image_root=image_root,
        max_image_pixels=max_image_pixels,
        report=report,
    )
    if keep_rows:
        return list(rows_iter), report
    for _ in rows_iter:
        pass
    return [], report


def validate_dataset(
    path: str | Path,
    kind: RowKind = "sft",
    *,
    max_images_per_message: int | None = 1,
    image_root: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Check a dataset without keeping its rows (bounded memory); returns the report."""
    return load_dataset(
        path,
        kind,
        max_images_per_message=max_images_per_message,
        image_root=image_root,
        max_image_pixels=max_image_pixels,
        keep_rows=False,
    )[1]
