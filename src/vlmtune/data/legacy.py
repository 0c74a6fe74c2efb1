"""Legacy row forms: a top-level ``images`` list (or LLaVA's ``image``) plus ``<image>``.

LLaVA / ShareGPT datasets keep images beside the conversation and mark where each
goes with a placeholder in the text. They are normalised into image parts, never
refused: placeholders are replaced in order; with none, the images go before the
first user text (where those datasets' own loaders put them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vlmtune.data.errors import RowError, type_name

PLACEHOLDER = "<image>"


@dataclass
class RawImage:
    ref: str
    field: str  # where the reference sits, for reasons


class _HasParts(Protocol):
    parts: list[str | RawImage]

    @property
    def role(self) -> str: ...


def legacy_images(obj: dict[str, Any]) -> tuple[list[RawImage], bool]:
    """The top-level ``images`` list (or LLaVA's single ``image``), and whether one was given."""
    if "images" in obj and obj["images"] is not None:
        images = obj["images"]
        if not isinstance(images, list):
            raise RowError(
                f"must be an array of image URLs (got {type_name(images)})",
                category="malformed images list",
                field="images",
            )
        out = []
        for k, ref in enumerate(images):
            if not isinstance(ref, str):
                raise RowError(
                    f"must be a URL or path string (got {type_name(ref)})",
                    category="malformed images list",
                    field=f"images[{k}]",
                )
            out.append(RawImage(ref, f"images[{k}]"))
        return out, True
    if isinstance(obj.get("image"), str):
        return [RawImage(obj["image"], "image")], True
    return [], False


def apply_legacy(messages: Sequence[_HasParts], images: list[RawImage]) -> None:
    """Replace ``<image>`` placeholders in order, or put the images before the first user text."""
    count = sum(p.count(PLACEHOLDER) for m in messages for p in m.parts if isinstance(p, str))
    if count == 0:
        first_user = next((m for m in messages if m.role == "user"), None)
        if first_user is None:
            raise RowError(
                "no user message to attach the images to",
                category="legacy images without a user turn",
                field="images",
            )
        first_user.parts[:0] = images
        return
    if count != len(images):
        raise RowError(
            f"{len(images)} image(s) but {count} {PLACEHOLDER} placeholder(s) in the text",
            category="image placeholder count mismatch",
            field="images",
        )
    pending = iter(images)
    for m in messages:
        parts: list[str | RawImage] = []
        for p in m.parts:
            if not isinstance(p, str) or PLACEHOLDER not in p:
                parts.append(p)
                continue
            for k, segment in enumerate(p.split(PLACEHOLDER)):
                if k:
                    parts.append(next(pending))
                # Whitespace between placeholders only separated them; real text is kept as is.
                if segment.strip():
                    parts.append(segment)
        m.parts = parts
