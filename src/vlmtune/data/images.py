"""Image bytes -> checked facts or pixels, with the guards every decode needs.

Two entry points share one opener so validation and training never disagree:

- ``probe_image`` (validation): decode the pixels once to prove the file is whole, read
  the EXIF orientation, return type and oriented size. No RGB conversion, no transpose.
- ``decode_image`` (render/engine): the same checks, then EXIF transpose and RGB.

The pixel limit is checked per call against the header size before any pixel is
decoded, so a decompression bomb costs a header parse, not gigabytes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from vlmtune.data.errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: far above any VLM input, far below a bomb
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # the transposes that swap width/height

# The encodings a dataset may carry, by MIME type, with Pillow's format name.
SUPPORTED_MIMES: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
MIME_ALIASES: dict[str, str] = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
_SHORT_NAMES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP", "image/gif": "GIF"}


@dataclass(frozen=True)
class ImageInfo:
    """What validation learns about an image: type from the bytes, size after EXIF."""

    mime: str
    width: int
    height: int


def sniff_mime(data: bytes) -> str | None:
    """The MIME type the magic bytes say, including a few unsupported ones (for messages)."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "image/avif" if head[8:12] == b"avif" else "image/heic"
    return None


def normalise_mime(mime: str) -> str:
    mime = mime.strip().lower()
    return MIME_ALIASES.get(mime, mime)


def mime_name(mime: str | None) -> str:
    """A short human name for a MIME type ("JPEG"), for reasons."""
    if mime is None:
        return "not a recognised image format"
    return _SHORT_NAMES.get(mime, mime)


def supported_mime(data: bytes) -> str:
    """The MIME type of ``data`` if it is a supported encoding, else ``ImageError``."""
    if not data:
        raise ImageError("image is empty (0 bytes)", category="empty image")
    mime = sniff_mime(data)
    if mime is None:
        raise ImageError(
            "bytes are not a recognised image format (supported: PNG, JPEG, WebP, GIF)",
            category="not an image",
        )
    if mime not in SUPPORTED_MIMES:
        raise ImageError(
            f"unsupported image type {mime} (supported: PNG, JPEG, WebP, GIF)",
            category="unsupported image type",
        )
    return mime


def _open_loaded(data: bytes, mime: str, max_pixels: int) -> Image.Image:
    """Open ``data`` as ``mime``, enforce ``max_pixels``, decode the (first frame's) pixels."""
    try:
        # Pillow's own bomb guard is global and only warns below 2x its limit; turning the
        # warning into an error makes it a refusal too, never a silent huge decode.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[SUPPORTED_MIMES[mime]])
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(
                    f"image has no pixels ({width}x{height})", category="corrupt image"
                )
            if width * height > max_pixels:
                raise _bomb(width, height, max_pixels)
            # Forces the full decode: a truncated or corrupt file fails here, not in training.
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image is too large to decode safely ({exc})", category="image too large"
        ) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        raise ImageError(
            f"corrupt or truncated {mime_name(mime)} image ({type(exc).__name__}: {exc})",
            category="corrupt or truncated image",
        ) from None
    return img


def _bomb(width: int, height: int, max_pixels: int) -> ImageError:
    return ImageError(
        f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
        f"{max_pixels:,} (decompression-bomb guard; raise max_image_pixels to allow it)",
        category="image over the pixel limit",
    )


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1
    return value if isinstance(value, int) else 1


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that ``data`` is a whole, supported image within ``max_pixels``.

    Returns the MIME type detected from the bytes and the size after EXIF orientation.
    Raises ``ImageError`` (a ``ValueError``) with a readable reason otherwise.
    """
    mime = supported_mime(data)
    img = _open_loaded(data, mime, max_pixels)
    try:
        width, height = img.size
        if _orientation(img) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    finally:
        img.close()
    return ImageInfo(mime=mime, width=width, height=height)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB ``PIL.Image`` (first frame, EXIF orientation applied).

    Raises ``ImageError`` (a ``ValueError``) for unsupported, corrupt or truncated bytes
    and for images over ``max_pixels``. Transparent pixels are composited on white, as
    the Hugging Face image processors do, so rendering matches their output.
    """
    mime = supported_mime(data)
    img = _open_loaded(data, mime, max_pixels)
    with contextlib.suppress(Exception):  # a broken EXIF block: keep the pixels as stored
        ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")
