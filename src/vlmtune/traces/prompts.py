"""Prompts as the trace store keeps them: each ``data:`` image swapped for a reference.

``externalize`` takes the images out (``sha256:<hex>`` of the image bytes), ``restore``
puts them back; a data URL that would not re-encode to exactly itself (non-canonical
base64, extra parameters) is left inline, so what comes back is always byte for byte
what went in. No SQL here: the store supplies the lookup.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

Messages = list[dict[str, Any]]
REF = "sha256:"


def _image_url(part: dict[str, Any]) -> tuple[str | None, Callable[[str], dict[str, Any]]]:
    """The part's image URL and how to rebuild the part around another URL (key order kept)."""
    kind = part.get("type")
    if kind == "image_url":
        value = part.get("image_url")
        if isinstance(value, str):
            return value, lambda url: {**part, "image_url": url}
        if isinstance(value, dict) and isinstance(value.get("url"), str):
            return value["url"], lambda url: {**part, "image_url": {**value, "url": url}}
    elif kind == "image" and isinstance(part.get("image"), str):
        return part["image"], lambda url: {**part, "image": url}
    return None, lambda url: part


def map_images(messages: Messages, fn: Callable[[str], str]) -> Messages:
    out: Messages = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            url, rebuild = _image_url(part) if isinstance(part, dict) else (None, None)
            parts.append(rebuild(fn(url)) if url is not None and rebuild else part)
        out.append({**message, "content": parts})
    return out


def decode_data_url(url: str) -> tuple[str, bytes] | None:
    """(mime, bytes) of a data URL that re-encodes to exactly itself; None for any other."""
    if not url.startswith("data:") or "," not in url:
        return None
    header, payload = url[5:].split(",", 1)
    if not header.endswith(";base64") or ";" in header[: -len(";base64")]:
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        return None
    if base64.b64encode(data).decode("ascii") != payload:
        return None  # restoring it would not give the same bytes: keep it inline
    return header[: -len(";base64")], data


def externalize(messages: Messages) -> tuple[Messages, dict[str, tuple[str, bytes]]]:
    """Messages with each data URL image replaced by ``sha256:<hex>``, and those images."""
    images: dict[str, tuple[str, bytes]] = {}

    def to_ref(url: str) -> str:
        decoded = decode_data_url(url)
        if decoded is None:
            return url
        digest = hashlib.sha256(decoded[1]).hexdigest()
        if images.setdefault(digest, decoded)[0] != decoded[0]:
            return url  # these bytes came under another type earlier: a reference would lie
        return REF + digest

    return map_images(messages, to_ref), images


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def prompt_hash(template: Messages) -> str:
    return hashlib.sha256(dumps(template).encode()).hexdigest()


def restore(template: Messages, lookup: Callable[[str], str | None]) -> Messages:
    """``template`` with each reference whose digest ``lookup`` knows (giving its data URL)
    put back; anything else (a URL that merely looks like a reference) is left as it is."""

    def to_url(url: str) -> str:
        if not url.startswith(REF):
            return url
        return lookup(url[len(REF) :]) or url

    return map_images(template, to_url)
