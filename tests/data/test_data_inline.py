"""``inline_dataset``: rewrite references in place, report failures, write atomically."""

from __future__ import annotations

import base64
import json

import pytest

from vlmtune.data import FetchPolicy, inline, inline_dataset, load_dataset

FAST = FetchPolicy(timeout_s=2, total_timeout_s=10, backoff_s=0.01)


def _decoded(url: str) -> bytes:
    assert url.startswith("data:")
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture
def served(mk, image_server):
    png, jpeg = mk.png((4, 4)), mk.jpeg((6, 2))
    image_server.routes["/a.png"] = image_server.Route(
        body=png, headers={"Content-Type": "image/png"}
    )
    image_server.routes["/b.jpg"] = image_server.Route(
        body=jpeg, headers={"Content-Type": "image/jpeg"}
    )
    image_server.routes["/html.png"] = image_server.Route(
        body=b"<html>", headers={"Content-Type": "image/png"}
    )
    image_server.routes["/page"] = image_server.Route(
        body=b"<html>", headers={"Content-Type": "text/html"}
    )
    image_server.routes["/big.png"] = image_server.Route(
        body=b"x" * 4096, headers={"Content-Type": "image/png"}
    )
    return image_server, png, jpeg


def test_every_reference_form_is_inlined_and_other_fields_kept(mk, tmp_path, served):
    server, png, jpeg = served
    (tmp_path / "local.png").write_bytes(png)
    kept = mk.png_url((0, 0, 255))
    rows = [
        {
            "id": "r1",
            "messages": [
                mk.user(
                    {
                        "type": "image_url",
                        "image_url": {"url": server.url("/a.png"), "detail": "high"},
                    },
                    "q",
                ),
                mk.assistant(),
            ],
            "metadata": {"source": "web"},
        },
        {
            "images": ["local.png"],
            "conversations": [
                {"from": "human", "value": "<image> hi"},
                {"from": "gpt", "value": "yo"},
            ],
        },
        {
            "messages": [
                mk.user(
                    {"type": "image", "image": server.url("/b.jpg")},
                    {"type": "image_url", "image_url": kept},
                ),
                mk.assistant(),
            ]
        },
    ]
    src = mk.write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    report = inline_dataset(src, out, allow_private_network=True, policy=FAST)
    assert (report.total, report.written, report.images, report.failed) == (3, 3, 3, [])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    first = got[0]
    assert first["id"] == "r1" and first["metadata"] == {"source": "web"}
    image_url = first["messages"][0]["content"][0]["image_url"]
    assert image_url["detail"] == "high" and _decoded(image_url["url"]) == png
    assert image_url["url"].startswith("data:image/png;base64,")
    assert (
        _decoded(got[1]["images"][0]) == png and got[1]["conversations"][0]["value"] == "<image> hi"
    )
    parts = got[2]["messages"][0]["content"]
    assert (
        parts[0]["image"].startswith("data:image/jpeg;base64,")
        and _decoded(parts[0]["image"]) == jpeg
    )
    assert parts[1]["image_url"] == kept  # already inline: untouched
    _, vreport = load_dataset(out, max_images_per_message=None)
    assert vreport.valid == 3 and vreport.dropped == []


def test_preference_sides_are_inlined(mk, tmp_path, served):
    server, png, _ = served
    side = {"messages": [mk.user(mk.img(server.url("/a.png")), "q"), mk.assistant()]}
    src = mk.write(tmp_path / "in.jsonl", [{"chosen": side, "rejected": side}])
    report = inline_dataset(
        src, tmp_path / "out.jsonl", kind="preference", allow_private_network=True, policy=FAST
    )
    assert report.images == 2 and len(server.requests) == 1  # same URL read once per row
    _, vreport = load_dataset(tmp_path / "out.jsonl", "preference")
    assert vreport.valid == 1


def test_failures_are_reported_and_those_rows_not_written(mk, tmp_path, served):
    server, _, _ = served
    rows = [
        mk.sft(server.url("/a.png")),
        mk.sft(server.url("/missing.png")),
        mk.sft(server.url("/page")),
        mk.sft(server.url("/big.png")),
        mk.sft(server.url("/html.png")),
        mk.sft("../elsewhere.png"),
        "not json",
        {"plain": "row without images"},
    ]
    src = mk.write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    policy = FetchPolicy(**{**FAST.__dict__, "max_bytes": 1000})
    report = inline_dataset(src, out, allow_private_network=True, policy=policy)
    reasons = {f["line"]: f["reason"] for f in report.failed}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert (
        reasons[2].startswith("messages[0].content[0].image_url.url: http://127.0.0.1:")
        and "HTTP 404" in reasons[2]
    )
    assert "content-type 'text/html' is not an image" in reasons[3]
    assert "download cap" in reasons[4]
    assert "not a recognised image format" in reasons[5]
    assert "outside the dataset directory" in reasons[6]
    assert reasons[7].startswith("not valid JSON")
    assert report.written == 2 and report.total == 8
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[1] == '{"plain": "row without images"}'
    assert "failed (not written): 6" in report.summary_text()


def test_loopback_is_refused_without_the_flag(mk, tmp_path, served):
    server, _, _ = served
    src = mk.write(tmp_path / "in.jsonl", [mk.sft(server.url("/a.png"))])
    report = inline_dataset(src, tmp_path / "out.jsonl", policy=FAST)
    assert "loopback" in report.failed[0]["reason"] and report.written == 0
    assert server.requests == []


def test_untouched_rows_are_copied_byte_for_byte(mk, tmp_path):
    line = '{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"é"}],  "x": 1.50}'
    src = mk.write(tmp_path / "in.jsonl", [line, "", mk.sft()])
    inline_dataset(src, tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()[0] == line


def test_out_is_replaced_only_at_the_end(mk, tmp_path, monkeypatch):
    src = mk.write(tmp_path / "in.jsonl", [mk.sft(), mk.sft(), mk.sft()])
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")
    real = inline._inline_line
    seen = []

    def crash_on_third(raw, line_no, *args):
        seen.append(out.read_text())  # while rows are written, OUT still holds the old file
        if line_no == 3:
            raise KeyboardInterrupt
        return real(raw, line_no, *args)

    monkeypatch.setattr(inline, "_inline_line", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        inline_dataset(src, out)
    assert seen == ["previous contents\n"] * 3
    assert out.read_text() == "previous contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp left
    monkeypatch.setattr(inline, "_inline_line", real)
    assert inline_dataset(src, out).written == 3
    assert len(out.read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_missing_input_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        inline_dataset(tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []
