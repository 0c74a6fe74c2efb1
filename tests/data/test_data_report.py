"""The validation report contract and the loader's streaming behaviour."""

from __future__ import annotations

import json
import logging

import pytest

from vlmtune.data import ValidationReport, iter_dataset, load_dataset, validate_dataset


def _mixed(mk):
    return [
        mk.sft(),
        "oops",
        mk.sft("https://a.test/x.png"),
        mk.sft("https://a.test/y.png"),
        mk.sft(),
    ]


def test_to_dict_has_exactly_the_documented_shape(load, mk):
    _, report = load(_mixed(mk))
    d = report.to_dict()
    keys = ["path", "kind", "total", "valid", "images", "images_dropped", "dropped", "warnings"]
    assert list(d) == keys
    assert (d["kind"], d["total"], d["valid"], d["images"]) == ("sft", 5, 2, 2)
    assert d["images_dropped"] == 0
    assert d["path"].endswith("data.jsonl")
    assert [sorted(x) for x in d["dropped"]] == [["line", "reason"]] * 3
    assert [x["line"] for x in d["dropped"]] == [2, 3, 4]
    assert d["warnings"] == []
    assert json.loads(json.dumps(d)) == d
    assert ValidationReport.from_dict(d).to_dict() == d


def test_summary_groups_reasons_with_counts_and_lines(load, mk):
    _, report = load(_mixed(mk) + [mk.sft("https://a.test/z.png")] * 5)
    text = report.summary_text()
    assert "rows read: 10" in text and "valid: 2" in text and "dropped: 8" in text
    assert (
        "7  remote image URL (run `vlmtune data inline`)  (lines 3, 4, 6, 7, 8, ... (+2))" in text
    )
    assert "1  not valid JSON  (line 2)" in text
    assert (
        "e.g. line 3: messages[0].content[0].image_url.url: remote URL https://a.test/x.png" in text
    )


def test_write_json_round_trips(load, mk, tmp_path):
    _, report = load(_mixed(mk))
    out = tmp_path / "validation_report.json"
    report.write_json(out)
    assert json.loads(out.read_text()) == report.to_dict()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keep_rows_false_and_validate_dataset_agree_with_load(load, mk, tmp_path):
    rows, report = load(_mixed(mk))
    path = tmp_path / "data.jsonl"
    no_rows, report2 = load_dataset(path, keep_rows=False)
    assert no_rows == [] and report2.to_dict() == report.to_dict()
    assert validate_dataset(path).to_dict() == report.to_dict()
    assert len(rows) == report.valid


def test_iter_dataset_streams_and_records_into_the_report(load, mk, tmp_path):
    load(_mixed(mk))
    report = ValidationReport(path="p", kind="sft")
    it = iter_dataset(tmp_path / "data.jsonl", report=report)
    first = next(it)
    assert first.line == 1 and report.total == 1
    assert [r.line for r in it] == [5]
    assert report.total == 5 and report.valid == 2 and len(report.dropped) == 3


def test_iter_dataset_without_a_report_logs_drops(load, mk, tmp_path, caplog):
    load(_mixed(mk))
    with caplog.at_level(logging.WARNING, logger="vlmtune.data"):
        assert len(list(iter_dataset(tmp_path / "data.jsonl"))) == 2
    assert "line 2 dropped: not valid JSON" in caplog.text


def test_unreadable_file_and_bad_kind_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        iter_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(IsADirectoryError):
        load_dataset(tmp_path)
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_dataset(tmp_path / "d.jsonl", "dpo")  # type: ignore[arg-type]
    rows, report = load_dataset(tmp_path / "d.jsonl")
    assert rows == [] and report.total == 0 and "no rows" in report.summary_text()
