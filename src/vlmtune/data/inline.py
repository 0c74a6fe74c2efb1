"""``vlmtune data inline``: rewrite every image reference of a JSONL file as a data URL.

Only the reference strings change; every other field is kept as the user wrote it
(a row with nothing to rewrite is copied byte for byte). Downloads go through the
SSRF guard in ``fetch.py``; local files follow the same root rules as validation.
OUT is written to a temp file beside it and renamed at the end, so it is never half
written: a crash or Ctrl-C leaves the previous OUT (or none) in place.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.atomic import atomic_write
from vlmtune.data.errors import RowError
from vlmtune.data.fetch import FetchPolicy, fetch_image
from vlmtune.data.images import DEFAULT_MAX_PIXELS, probe_image
from vlmtune.data.lines import read_lines
from vlmtune.data.refs import RefContext, data_url, is_remote, read_local, ref_scheme, shorten
from vlmtune.data.rows import KINDS

# (container, key, field path): ``container[key]`` is one image reference string.
RefSlot = tuple[Any, Any, str]


@dataclass
class InlineReport:
    path: str
    out: str
    total: int = 0  # non-blank lines read
    written: int = 0
    images: int = 0  # references rewritten as data URLs
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "out": self.out,
            "total": self.total,
            "written": self.written,
            "images": self.images,
            "failed": list(self.failed),
        }

    def summary_text(self) -> str:
        lines = [
            f"{self.path} -> {self.out}",
            f"  rows read: {self.total:,}   written: {self.written:,}   "
            f"failed (not written): {len(self.failed):,}   images inlined: {self.images:,}",
        ]
        for f in self.failed[:20]:
            lines.append(f"  line {f['line']}: {f['reason']}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20:,} more (use --json for all)")
        return "\n".join(lines)


def _part_slots(part: Any, where: str) -> Iterator[RefSlot]:
    if not isinstance(part, dict):
        return
    if part.get("type") == "image_url":
        value = part.get("image_url")
        if isinstance(value, str):
            yield part, "image_url", f"{where}.image_url"
        elif isinstance(value, dict) and isinstance(value.get("url"), str):
            yield value, "url", f"{where}.image_url.url"
    elif part.get("type") == "image":
        for key in ("image", "url", "path"):
            if isinstance(part.get(key), str):
                yield part, key, f"{where}.{key}"
                return


def _message_slots(messages: Any, where: str) -> Iterator[RefSlot]:
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        content = m.get("content", m.get("value"))
        if isinstance(content, list):
            for j, part in enumerate(content):
                yield from _part_slots(part, f"{where}[{i}].content[{j}]")


def image_slots(obj: dict[str, Any], kind: str | None = None) -> Iterator[RefSlot]:
    """Every image reference in a raw row, in the forms the loader accepts."""
    images = obj.get("images")
    if isinstance(images, list):
        for k, ref in enumerate(images):
            if isinstance(ref, str):
                yield images, k, f"images[{k}]"
    elif isinstance(obj.get("image"), str):
        yield obj, "image", "image"
    if kind in (None, "sft", "rl"):
        for key in ("messages", "conversations"):
            yield from _message_slots(obj.get(key), key)
    if kind in (None, "preference"):
        for side in ("chosen", "rejected"):
            value = obj.get(side)
            if isinstance(value, dict):
                yield from _message_slots(value.get("messages"), f"{side}.messages")
            else:
                yield from _message_slots(value, side)


class _Inliner:
    def __init__(self, ctx: RefContext, policy: FetchPolicy) -> None:
        self.ctx = ctx
        self.policy = policy

    def to_data_url(self, ref: str) -> str:
        if is_remote(ref):
            data = fetch_image(ref, self.policy).data
        elif ref_scheme(ref) in ("", "file"):
            if not ref.strip():
                raise RowError("empty image reference", category="empty image reference")
            data = read_local(ref, self.ctx)
        else:
            raise RowError(f"unsupported URL scheme '{ref_scheme(ref)}:'")
        # Decode now: an HTML error page served as image/png must fail here, not in training.
        info = probe_image(data, self.ctx.max_pixels)
        return data_url(data, info.mime)

    def rewrite(self, obj: dict[str, Any], kind: str | None) -> int:
        """Rewrite the row's references in place; the number rewritten."""
        done: dict[str, str] = {}  # the same URL twice in a row (chosen/rejected) is read once
        count = 0
        for container, key, where in list(image_slots(obj, kind)):
            ref = container[key]
            if ref_scheme(ref) == "data":
                continue  # already inline; validation checks it
            if ref not in done:
                try:
                    done[ref] = self.to_data_url(ref)
                except RowError as exc:
                    raise RowError(
                        f"{shorten(ref)}: {exc}", category=exc.category, field=where
                    ) from None
            container[key] = done[ref]
            count += 1
        return count


def inline_dataset(
    in_path: str | Path,
    out_path: str | Path,
    *,
    kind: str | None = None,
    image_root: str | Path | None = None,
    allow_private_network: bool = False,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    policy: FetchPolicy | None = None,
    progress: Callable[[InlineReport], None] | None = None,
) -> InlineReport:
    """Write ``out_path``: ``in_path`` with every image reference as a base64 data URL.

    Rows whose images cannot be read are not written; each is reported as
    ``{line, reason}``. ``policy`` overrides the download policy (its
    ``allow_private_network`` is replaced by the argument). Raises ``OSError`` if
    ``in_path`` cannot be read or ``out_path`` cannot be written; then OUT is untouched.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    in_path, out_path = Path(in_path), Path(out_path)
    base = policy or FetchPolicy()
    policy = dataclasses.replace(base, allow_private_network=allow_private_network)
    inliner = _Inliner(RefContext.for_dataset(in_path, image_root, max_image_pixels), policy)
    report = InlineReport(path=str(in_path), out=str(out_path))
    with in_path.open("rb") as src, atomic_write(out_path) as dst:
        for read in read_lines(src):
            if read.too_long:
                report.total += 1
                report.failed.append({"line": read.number, "reason": read.too_long_reason()})
                continue
            line = _inline_line(read.data, read.number, kind, inliner, report)
            if line is not None:
                dst.write(line + "\n")
                report.written += 1
            if progress is not None:
                progress(report)
    return report


def _inline_line(
    raw: bytes, line_no: int, kind: str | None, inliner: _Inliner, report: InlineReport
) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    report.total += 1
    try:
        text = raw.decode("utf-8")
        if line_no == 1:
            text = text.removeprefix("\ufeff")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        report.failed.append({"line": line_no, "reason": f"not valid JSON: {exc}"})
        return None
    if not isinstance(obj, dict):
        report.failed.append({"line": line_no, "reason": "row is not a JSON object"})
        return None
    try:
        count = inliner.rewrite(obj, kind)
    except RowError as exc:
        report.failed.append({"line": line_no, "reason": str(exc)})
        return None
    except Exception as exc:  # one bad row must not lose the rest of the file
        report.failed.append(
            {"line": line_no, "reason": f"internal error: {type(exc).__name__}: {exc}"}
        )
        return None
    report.images += count
    # Untouched rows are copied as written; rewritten ones keep every other field.
    return text if count == 0 else json.dumps(obj, ensure_ascii=False)
