"""The lines of a JSONL file, read with a bounded ``readline``: the one way the data
layer reads a dataset (``validate.iter_dataset``, training, ``inline_images``).

``for raw in f`` holds a whole line in memory, whatever its length: a dataset written
as one JSON array is one line of hundreds of MB, read whole and then parsed whole. Here
no line longer than ``MAX_LINE_BYTES`` is held: the rest of it is skipped in chunks,
and the line comes out as ``too_long`` with its length, for the caller to drop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# The longest line kept. A row's images travel inline as base64 data URLs: a 12 MP
# photo is about 5-10 MB as PNG, 7-14 MB as base64, and a row rarely has more than a
# few, so a real row stays far below this; a longer line is a dataset on one line
# (a JSON array) or not JSONL at all. Read at call time, so a test can lower it.
MAX_LINE_BYTES = 64 * 2**20
# How much of an over-long line is read at a time while skipping it.
_SKIP_CHUNK = 2**20


@dataclass(frozen=True)
class Line:
    """Line ``number`` (1-based) of the file: its bytes, newline included, or ``b""``
    when it is ``too_long``; ``length`` counts its bytes without the newline."""

    number: int
    data: bytes
    length: int
    too_long: bool = False

    def too_long_reason(self, limit: int | None = None) -> str:
        limit = MAX_LINE_BYTES if limit is None else limit
        return (
            f"line of {self.length:,} bytes, over the {limit:,} a row may have "
            "(JSONL is one JSON object per line; a whole dataset on one line, such as a "
            "JSON array, must be split into one row per line)"
        )


def read_lines(f: BinaryIO, max_bytes: int | None = None) -> Iterator[Line]:
    """Yield every line of ``f`` (opened in binary mode); none over ``max_bytes``
    (default ``MAX_LINE_BYTES``) is ever held whole."""
    limit = MAX_LINE_BYTES if max_bytes is None else max_bytes
    number = 0
    while True:
        # One byte over the limit tells a line of exactly ``limit`` bytes (then its
        # newline) from a longer one.
        data = f.readline(limit + 1)
        if not data:
            return
        number += 1
        content = len(data) - data.endswith(b"\n")
        if content <= limit:
            yield Line(number, data, content)
            continue
        length = len(data)
        del data  # only the count is kept
        while True:
            chunk = f.readline(_SKIP_CHUNK)
            if not chunk:
                break
            if chunk.endswith(b"\n"):
                length += len(chunk) - 1
                break
            length += len(chunk)
        yield Line(number, b"", length, too_long=True)
