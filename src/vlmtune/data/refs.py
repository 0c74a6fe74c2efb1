"""Image references (data URL, local path, file:// URL, remote URL) -> checked bytes.

Training and validation read only data URLs and local files. Remote URLs are refused
here on purpose: fetching during training would make a run depend on the network and
let a dataset make the trainer fetch arbitrary addresses; ``vlmtune data inline`` does
the fetching once, behind the SSRF guard in ``fetch.py``.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from vlmtune.data.errors import RowError
from vlmtune.data.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_MIMES,
    mime_name,
    normalise_mime,
    probe_image,
    supported_mime,
)
from vlmtune.data.schema import ImagePart

# A local image larger than this is refused before it is read (e.g. a path to a disk image).
MAX_LOCAL_IMAGE_BYTES = 64 * 1024 * 1024
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
INLINE_HINT = "run `vlmtune data inline IN OUT` to download it into the file as a data URL"


@dataclass(frozen=True)
class RefContext:
    """Where local paths resolve and which directory they must stay under."""

    base_dir: Path  # the dataset file's directory, resolved
    image_root: Path | None = None  # when set, local images must resolve under it instead
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def for_dataset(
        cls,
        dataset_path: str | Path,
        image_root: str | Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> RefContext:
        root = Path(image_root).expanduser().resolve() if image_root is not None else None
        return cls(Path(dataset_path).resolve().parent, root, max_pixels)


def ref_scheme(ref: str) -> str:
    """``"data"``, ``"file"``, ``"http"``, ``"https"``, another scheme, or ``""`` (a path)."""
    m = _SCHEME.match(ref)
    # One letter before ":" is a Windows drive (C:\...), not a scheme.
    if m is None or len(m.group(1)) == 1:
        return ""
    return m.group(1).lower()


def is_remote(ref: str) -> bool:
    return ref_scheme(ref) in ("http", "https")


def shorten(ref: str, limit: int = 80) -> str:
    """A short printable form of a reference (data URLs lose their payload)."""
    if ref_scheme(ref) == "data":
        header = ref[: ref.find(",")] if "," in ref[:200] else ref[:40]
        return f"{header},... ({len(ref):,} chars)"
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."


def parse_data_url(ref: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<payload>`` -> (declared mime, bytes). Raises ``RowError``."""
    comma = ref.find(",")
    if comma < 0:
        raise RowError("malformed data URL (no comma)", category="malformed data URL")
    params = ref[5:comma].split(";")
    declared = normalise_mime(params[0])
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise RowError(
            "data URL is not base64-encoded (expected data:image/...;base64,...)",
            category="data URL not base64",
        )
    try:
        data = binascii.a2b_base64(ref[comma + 1 :])
    except (binascii.Error, ValueError) as exc:
        raise RowError(f"data URL has invalid base64 ({exc})", category="invalid base64") from None
    return declared, data


def data_url(data: bytes, mime: str) -> str:
    """Encode ``data`` as a base64 data URL."""
    return f"data:{mime};base64,{binascii.b2a_base64(data, newline=False).decode('ascii')}"


def _check_declared(declared: str, data: bytes) -> str:
    actual = supported_mime(data)
    if not declared:
        raise RowError(
            f"data URL declares no MIME type (the bytes are {mime_name(actual)}; "
            f"write data:{actual};base64,...)",
            category="data URL without MIME type",
        )
    if declared != actual:
        if declared not in SUPPORTED_MIMES and declared.startswith("image/"):
            detail = f"data URL declares {declared}, which is unsupported"
        else:
            detail = f"data URL declares {declared}"
        raise RowError(
            f"{detail} but the bytes are {mime_name(actual)}", category="MIME type mismatch"
        )
    return actual


def local_path(ref: str, ctx: RefContext) -> Path:
    """Resolve a path or file:// URL and refuse it if it leaves the allowed directory."""
    if ref_scheme(ref) == "file":
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise RowError(
                f"file URL names a host ({parts.netloc}); only local files are read",
                category="file URL with a host",
            )
        raw = unquote(parts.path)
    else:
        raw = ref
    given = Path(raw).expanduser()
    # resolve() follows every symlink, so a link pointing out of the root is caught too.
    resolved = (ctx.base_dir / given).resolve()
    root = ctx.image_root or ctx.base_dir
    if not resolved.is_relative_to(root):
        if ctx.image_root is not None:
            why = f"outside image_root {root}"
        else:
            why = (
                f"outside the dataset directory {root}; pass image_root (--image-root DIR) "
                "to allow images under another directory"
            )
        kind = "absolute path" if given.is_absolute() else "path"
        raise RowError(
            f"{kind} {shorten(ref)} resolves to {resolved}, {why}",
            category="image path outside the allowed directory",
        )
    return resolved


def read_local(ref: str, ctx: RefContext) -> bytes:
    path = local_path(ref, ctx)
    try:
        if not path.is_file():
            what = "not found" if not path.exists() else "not a regular file"
            raise RowError(f"image {shorten(ref)} {what} ({path})", category="image file not found")
        with path.open("rb") as f:
            data = f.read(MAX_LOCAL_IMAGE_BYTES + 1)
    except OSError as exc:
        raise RowError(
            f"cannot read image {shorten(ref)}: {exc.strerror or exc}",
            category="image file unreadable",
        ) from None
    if len(data) > MAX_LOCAL_IMAGE_BYTES:
        raise RowError(
            f"image file {shorten(ref)} is over {MAX_LOCAL_IMAGE_BYTES // 2**20} MiB",
            category="image file too large",
        )
    return data


def load_ref_bytes(ref: str, ctx: RefContext) -> tuple[bytes, str]:
    """Bytes and their MIME type for a non-remote reference; remote ones raise."""
    if not isinstance(ref, str) or not ref.strip():
        raise RowError("empty image reference", category="empty image reference")
    scheme = ref_scheme(ref)
    if scheme == "data":
        declared, data = parse_data_url(ref)
        return data, _check_declared(declared, data)
    if scheme in ("http", "https"):
        raise RowError(
            f"remote URL {shorten(ref)} is not read during training or validation; {INLINE_HINT}",
            category="remote image URL (run `vlmtune data inline`)",
        )
    if scheme not in ("", "file"):
        raise RowError(
            f"unsupported URL scheme '{scheme}:' (use a data URL, a local path or https://)",
            category="unsupported URL scheme",
        )
    data = read_local(ref, ctx)
    return data, supported_mime(data)


def resolve_image(ref: str, ctx: RefContext) -> ImagePart:
    """A checked ``ImagePart`` for ``ref``; any problem raises ``RowError`` with the reason."""
    data, mime = load_ref_bytes(ref, ctx)
    info = probe_image(data, ctx.max_pixels)
    if info.mime != mime:  # cannot happen today (both sniff); kept as a tripwire
        raise RowError(f"image type changed while decoding ({mime} vs {info.mime})")
    return ImagePart(
        data=data, mime=info.mime, width=info.width, height=info.height, source=shorten(ref)
    )
