"""``data.lines.read_lines``: a line over the limit (a whole dataset written as one JSON
array) is dropped with its length, never held whole, in every reader of a dataset."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest

from vlmtune.data import lines as lines_module
from vlmtune.data import validate_dataset
from vlmtune.data.inline import inline_dataset
from vlmtune.data.lines import read_lines

ROW = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)


def test_lines_up_to_the_limit_are_kept_and_a_longer_one_is_measured_and_skipped():
    text = b"12345\n123456\n1234567\nlast"  # limit 6: 5 and 6 bytes fit; 7 does not
    got = list(read_lines(io.BytesIO(text), max_bytes=6))
    assert [(x.number, x.data, x.length, x.too_long) for x in got] == [
        (1, b"12345\n", 5, False),
        (2, b"123456\n", 6, False),
        (3, b"", 7, True),
        (4, b"last", 4, False),  # the line after the long one starts where it should
    ]


def test_a_long_last_line_without_a_newline_and_a_long_line_of_many_chunks():
    long_line = b"x" * (3 * 2**20 + 5)  # several skip chunks
    got = list(read_lines(io.BytesIO(b"ok\n" + long_line + b"\n" + long_line), max_bytes=100))
    n = len(long_line)
    assert [(x.number, x.length, x.too_long) for x in got] == [
        (1, 2, False),
        (2, n, True),
        (3, n, True),
    ]


def _one_line_dataset(path: Path, n_bytes: int) -> None:
    """``n_bytes`` of one JSON array of rows on one line, then a good row."""
    n_rows = n_bytes // (len(ROW) + 2)
    with path.open("w") as f:
        f.write("[" + ", ".join([ROW] * n_rows) + "]\n")
        f.write(ROW + "\n")


def test_validate_drops_an_over_long_line_naming_its_line_and_length(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_module, "MAX_LINE_BYTES", 4096)
    path = tmp_path / "one_line.jsonl"
    _one_line_dataset(path, 20_000)
    report = validate_dataset(path)
    assert report.total == 2 and report.valid == 1
    (dropped,) = report.dropped
    assert dropped["line"] == 1
    length = len(path.read_bytes().split(b"\n")[0])
    assert f"line of {length:,} bytes, over the 4,096 a row may have" in dropped["reason"]
    assert "one row per line" in dropped["reason"]

    # `vlmtune data inline` reads through the same reader.
    out = inline_dataset(path, tmp_path / "out.jsonl")
    assert out.total == 2 and out.written == 1
    assert out.failed[0]["line"] == 1 and "4,096" in out.failed[0]["reason"]


def test_a_50_mb_line_is_never_held_in_memory(tmp_path, monkeypatch):
    """With a 1 MiB limit, validating a file whose first line is 50 MB peaks far below
    the line's size: it is skipped in chunks, not read and parsed whole."""
    monkeypatch.setattr(lines_module, "MAX_LINE_BYTES", 2**20)
    path = tmp_path / "big.jsonl"
    _one_line_dataset(path, 50 * 2**20)
    tracemalloc.start()
    try:
        report = validate_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.valid == 1 and report.dropped[0]["line"] == 1
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 50 MB line"


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[" + ROW + "]"])
def test_an_array_under_the_limit_is_dropped_without_parsing(tmp_path, text):
    path = tmp_path / "array.jsonl"
    path.write_text(text + "\n" + ROW + "\n")
    report = validate_dataset(path)
    assert report.valid == 1
    assert report.dropped == [{"line": 1, "reason": "row is an array, not a JSON object"}]
