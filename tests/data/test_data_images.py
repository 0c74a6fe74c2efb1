"""Image decoding guards: formats, bombs, truncation, corruption, EXIF, frames, alpha."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlmtune.data.errors import ImageError
from vlmtune.data.images import decode_image, probe_image, sniff_mime


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_supported_formats_probe_and_decode(mk, fmt, mime):
    data = mk.image(fmt, (10, 4))
    info = probe_image(data)
    assert (info.mime, info.width, info.height) == (mime, 10, 4)
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (10, 4)


def test_gif_first_frame_is_used(mk):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = decode_image(data).getpixel((1, 1))
    assert r > 200 and b < 50
    assert probe_image(data).mime == "image/gif"


def test_exif_orientation_6_swaps_width_and_height(mk):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = mk.jpeg((40, 20), exif=exif.tobytes())
    info = probe_image(data)
    assert (info.width, info.height) == (20, 40)
    assert decode_image(data).size == (20, 40)


def test_transparent_pixels_composite_on_white(mk):
    img = decode_image(mk.png(color=(10, 20, 30, 0)))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_bomb_over_configured_limit_is_refused_before_decoding(mk):
    data = mk.png((100, 100))
    with pytest.raises(ImageError, match="over the limit of 9,999"):
        probe_image(data, max_pixels=9_999)
    assert probe_image(data, max_pixels=10_000).width == 100


@pytest.mark.parametrize(
    "side", [9_000, 50_000]
)  # over our 64 MP default; over Pillow's own 2x guard
def test_bomb_header_is_refused_with_default_limit(mk, side):
    data = mk.png_header_only(side, side)
    assert len(data) < 200
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert "too large" in str(err.value) or "over the limit" in str(err.value)


def test_truncated_jpeg_is_refused(mk):
    data = mk.jpeg((64, 64), quality=95)
    with pytest.raises(ImageError, match="corrupt or truncated JPEG"):
        probe_image(data[: len(data) // 2])


def test_corrupt_png_is_refused(mk):
    data = bytearray(mk.noise_png())
    idat = data.index(b"IDAT") + 4
    data[idat + 10 : idat + 40] = b"\x00" * 30
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):
        probe_image(bytes(data))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not a recognised image format"),
        (b"BM" + b"\x00" * 60, "unsupported image type image/bmp"),
    ],
)
def test_non_images_are_refused(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)
    assert sniff_mime(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
