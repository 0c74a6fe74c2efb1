"""Image references: data URLs, local paths under the dataset root, remote URLs refused."""

from __future__ import annotations

import os

import pytest

from vlmtune.data.errors import RowError
from vlmtune.data.refs import RefContext, resolve_image, shorten


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "ds").mkdir()
    return RefContext.for_dataset(tmp_path / "ds" / "data.jsonl")


def test_data_url_keeps_original_bytes(mk, ctx):
    data = mk.png((5, 3))
    part = resolve_image(mk.data_url(data), ctx)
    assert (part.data, part.mime, part.width, part.height) == (data, "image/png", 5, 3)
    assert part.source.startswith("data:image/png;base64,...")


def test_data_url_jpg_alias_is_accepted(mk, ctx):
    assert resolve_image(mk.data_url(mk.jpeg(), "image/jpg"), ctx).mime == "image/jpeg"


@pytest.mark.parametrize(
    ("make_url", "match"),
    [
        (
            lambda mk: mk.data_url(mk.jpeg(), "image/png"),
            "declares image/png but the bytes are JPEG",
        ),
        (
            lambda mk: mk.data_url(mk.png(), "image/webp"),
            "declares image/webp but the bytes are PNG",
        ),
        (lambda mk: mk.data_url(mk.png(), ""), "declares no MIME type"),
        (lambda mk: "data:image/png," + "x", "not base64"),
        (lambda mk: "data:image/png;base64,abc", "invalid base64"),
        (lambda mk: "data:image/png;base64", "no comma"),
        (
            lambda mk: mk.data_url(b"BM" + b"\0" * 40, "image/bmp"),
            "unsupported image type image/bmp",
        ),
    ],
)
def test_bad_data_urls(mk, ctx, make_url, match):
    with pytest.raises(RowError, match=match):
        resolve_image(make_url(mk), ctx)


def test_relative_and_file_url_paths_resolve_from_the_dataset_dir(mk, ctx):
    (ctx.base_dir / "img").mkdir()
    (ctx.base_dir / "img" / "a.png").write_bytes(mk.png((7, 2)))
    assert resolve_image("img/a.png", ctx).width == 7
    assert resolve_image("file:img/a.png", ctx).width == 7
    assert resolve_image(f"file://{ctx.base_dir}/img/a.png", ctx).width == 7
    absolute = str(ctx.base_dir / "img" / "a.png")
    # The source is the reference as written, shortened for reports (tmp paths vary).
    assert resolve_image(absolute, ctx).source == shorten(absolute)


def test_escaping_paths_are_refused_unless_image_root_allows_them(mk, ctx, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(mk.png())
    os.symlink(outside, ctx.base_dir / "link.png")
    cases = {
        "../outside.png": "path ../outside.png resolves to",
        str(outside): "absolute path",
        f"file://{outside}": "outside the dataset directory",
        "link.png": "outside the dataset directory",
    }
    for ref, match in cases.items():
        with pytest.raises(RowError, match=match) as err:
            resolve_image(ref, ctx)
        assert "--image-root" in str(err.value)
    allowed = RefContext.for_dataset(ctx.base_dir / "data.jsonl", image_root=tmp_path)
    for ref in cases:
        assert resolve_image(ref, allowed).mime == "image/png"


def test_image_root_is_the_only_allowed_root_when_given(mk, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "here.png").write_bytes(mk.png())
    (tmp_path / "imgs").mkdir()
    ctx = RefContext.for_dataset(ds / "data.jsonl", image_root=tmp_path / "imgs")
    with pytest.raises(RowError, match="outside image_root"):
        resolve_image("here.png", ctx)


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("https://example.com/a.png", "not read during training.*vlmtune data inline"),
        ("http://example.com/a.png", "vlmtune data inline"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp:'"),
        ("missing.png", "not found"),
        ("", "empty image reference"),
        ("file://otherhost/a.png", "names a host"),
    ],
)
def test_other_references_are_refused(ctx, ref, match):
    with pytest.raises(RowError, match=match):
        resolve_image(ref, ctx)


def test_directory_is_not_an_image(ctx):
    (ctx.base_dir / "dir.png").mkdir()
    with pytest.raises(RowError, match="not a regular file"):
        resolve_image("dir.png", ctx)
