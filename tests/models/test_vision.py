from __future__ import annotations

import io
import itertools

import pytest
import torch
from PIL import Image

from vlmtune.models import vision
from vlmtune.models.registry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from vlmtune.models.vision import ImagePreprocessor

SIZES = [1, 7, 16, 31, 32, 33, 48, 64, 65, 100, 127, 224, 300, 333, 512, 640, 1000, 1920, 4000]


@pytest.mark.parametrize(
    "limits", [(None, None), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), (32 * 32, 32 * 32 * 16)]
)
def test_num_tokens_matches_processor_count(tiny_processor, limits) -> None:
    ip = ImagePreprocessor(tiny_processor.image_processor, *limits)
    kwargs = {"min_pixels": ip.min_pixels, "max_pixels": ip.max_pixels}
    for w, h in itertools.product(SIZES, SIZES):
        if max(w, h) / min(w, h) > 200:
            continue
        patches = tiny_processor.image_processor.get_number_of_image_patches(h, w, kwargs)
        assert ip.num_tokens(w, h) == patches // 4, (w, h)


@pytest.mark.parametrize("size", [(64, 64), (8, 8), (100, 37), (333, 517), (1200, 90)])
def test_num_tokens_matches_real_preprocessing(tiny_processor, size) -> None:
    ip = ImagePreprocessor(tiny_processor.image_processor, 32 * 32, 32 * 32 * 64)
    pixel_values, grid = ip.preprocess([Image.new("RGB", size, "white")])
    assert grid.shape == (1, 3)
    assert int(grid.prod()) // 4 == ip.num_tokens(*size)
    assert pixel_values.shape == (int(grid.prod()), 3 * 2 * 16 * 16)
    # The processor's own expansion of <|image_pad|> agrees.
    out = tiny_processor(text=["<|image_pad|>"], images=[Image.new("RGB", size)], size=ip.size)
    assert len(out["input_ids"][0]) == ip.num_tokens(*size)


def test_defaults_come_from_processor(tiny_processor) -> None:
    ip = ImagePreprocessor.from_processor(tiny_processor)
    assert ip.min_pixels == tiny_processor.image_processor.size["shortest_edge"]
    assert ip.max_pixels == tiny_processor.image_processor.size["longest_edge"]
    with pytest.raises(ValueError):
        ImagePreprocessor(tiny_processor.image_processor, 10_000, 100)


def test_extreme_aspect_ratio_is_refused(tiny_processor) -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        ImagePreprocessor.from_processor(tiny_processor).num_tokens(4000, 10)


def _png(size, color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_preprocess_bytes_caches_by_content(tiny_processor, monkeypatch) -> None:
    calls = []
    real = vision.decode_image_bytes
    monkeypatch.setattr(vision, "decode_image_bytes", lambda d: calls.append(1) or real(d))
    ip = ImagePreprocessor.from_processor(tiny_processor)
    a = _png((64, 64))
    pv1, g1 = ip.preprocess_bytes(a)
    pv2, g2 = ip.preprocess_bytes(bytes(a))  # equal bytes, different object
    assert len(calls) == 1 and pv1 is pv2 and torch.equal(g1, g2)
    ip.preprocess_bytes(_png((64, 64), "blue"))
    assert len(calls) == 2
    pv, grid = ip.preprocess_many([a, _png((128, 64), "blue")])
    assert grid.tolist() == [[1, 4, 4], [1, 4, 8]] and pv.shape[0] == 16 + 32


def test_cache_is_bounded_by_bytes(tiny_processor) -> None:
    ip = ImagePreprocessor(tiny_processor.image_processor, cache_bytes=40_000)
    one = 16 * 1536 * 4  # a 64x64 image: 16 patches of 1536 floats
    for color in ("red", "green", "blue"):
        ip.preprocess_bytes(_png((64, 64), color))
        assert ip._cache_used <= 40_000
    assert len(ip._cache) == 40_000 // one


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed size is 20x40
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert vision.decode_image_bytes(buf.getvalue()).size == (20, 40)
