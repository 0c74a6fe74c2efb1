"""One JSON object -> one normalised row (SFT, preference, RL prompt), or a ``RowError``.

Parsing happens in two passes per message list: first the structure (roles, parts,
legacy ``images`` + ``<image>`` placeholders, the per-message image cap), then the
surviving image references are resolved and decoded. Images cut by the cap are never
read, exactly as the trainer never uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.data.errors import RowError, type_name
from vlmtune.data.legacy import PLACEHOLDER, RawImage, apply_legacy, legacy_images
from vlmtune.data.refs import RefContext, resolve_image
from vlmtune.data.schema import (
    ImagePart,
    Message,
    Part,
    PreferenceRow,
    RLRow,
    Role,
    Row,
    RowKind,
    SFTRow,
    TextPart,
    ToolCall,
    row_images,
)
from vlmtune.data.tools import check_tool_fields, check_tool_turns, parse_tool_calls, parse_tools

ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES: dict[str, Role] = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_ROLES.update({r: r for r in ROLES})
KINDS: tuple[RowKind, ...] = ("sft", "preference", "rl")


@dataclass
class _RawMessage:
    role: Role
    parts: list[str | RawImage]
    weight: float | None
    field: str
    content_field: str
    tool_calls: list[ToolCall]
    tool_call_id: str | None


@dataclass
class ParsedRow:
    row: Row
    images: int
    warnings: list[str] = field(default_factory=list)
    images_dropped: int = 0  # images cut by the per-message cap


@dataclass
class _Notes:
    """What parsing one row has to report besides the row itself."""

    warnings: list[str] = field(default_factory=list)
    images_dropped: int = 0


def _empty_text(where: str) -> RowError:
    return RowError("empty text", category="empty text", field=where)


def _image_ref(part: dict[str, Any], where: str) -> RawImage:
    kind = part["type"]
    if kind == "image_url":
        value = part.get("image_url")
        if isinstance(value, str):
            return RawImage(value, f"{where}.image_url")
        if isinstance(value, dict) and isinstance(value.get("url"), str):
            return RawImage(value["url"], f"{where}.image_url.url")
        raise RowError(
            f"must be an object with a string 'url' or a URL string (got {type_name(value)})",
            category="malformed image_url part",
            field=f"{where}.image_url",
        )
    # {"type": "image", "image": url}, also the "url"/"path" spellings some tools write.
    for key in ("image", "url", "path"):
        if isinstance(part.get(key), str):
            return RawImage(part[key], f"{where}.{key}")
    raise RowError(
        "image part needs a string 'image' (a URL or path)",
        category="malformed image part",
        field=f"{where}.image",
    )


def _parse_parts(content: Any, where: str) -> list[str | RawImage]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise RowError(
            f"must be a string or an array of parts (got {type_name(content)})",
            category="malformed content",
            field=where,
        )
    parts: list[str | RawImage] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RowError(
                f"part must be an object (got {type_name(part)})",
                category="malformed part",
                field=at,
            )
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RowError(
                    f"must be a string (got {type_name(text)})",
                    category="malformed text part",
                    field=f"{at}.text",
                )
            if not text.strip():
                raise _empty_text(f"{at}.text")
            parts.append(text)
        elif kind in ("image_url", "image"):
            parts.append(_image_ref(part, at))
        else:
            raise RowError(
                f"unknown part type {kind!r} (expected 'text', 'image_url' or 'image')",
                category="unknown part type",
                field=f"{at}.type",
            )
    return parts


def _parse_weight(raw: dict[str, Any], where: str) -> float | None:
    if "weight" not in raw or raw["weight"] is None:
        return None
    w = raw["weight"]
    if isinstance(w, bool | int | float) and w in (0, 1):
        return float(w)
    raise RowError(f"must be 0 or 1 (got {w!r})", category="bad weight", field=f"{where}.weight")


def _parse_message(raw: Any, where: str) -> _RawMessage:
    if not isinstance(raw, dict):
        raise RowError(
            f"message must be an object (got {type_name(raw)})",
            category="malformed message",
            field=where,
        )
    table: tuple[str, ...]
    if "role" in raw or "from" not in raw:
        role, role_key, content_key, table = raw.get("role"), "role", "content", ROLES
    else:  # ShareGPT: {"from": "human"|"gpt"|"system", "value": ...}
        role, role_key, content_key = raw.get("from"), "from", "value"
        table = tuple(SHAREGPT_ROLES)
    if role not in table:
        expected = ", ".join(repr(r) for r in table)
        raise RowError(
            f"unknown role {role!r} (expected one of {expected})",
            category="unknown role",
            field=f"{where}.{role_key}",
        )
    role = SHAREGPT_ROLES[role]
    tool_calls = parse_tool_calls(raw.get("tool_calls"), f"{where}.tool_calls")
    tool_call_id = raw.get("tool_call_id")
    check_tool_fields(role, tool_calls, tool_call_id, raw, where)
    content = raw.get(content_key)
    if content is None and not tool_calls:  # a tool-calling turn may have no text
        raise RowError("missing", category="missing content", field=f"{where}.{content_key}")
    return _RawMessage(
        role=role,
        parts=[] if content is None else _parse_parts(content, f"{where}.{content_key}"),
        weight=_parse_weight(raw, where),
        field=where,
        content_field=f"{where}.{content_key}",
        tool_calls=tool_calls,
        tool_call_id=tool_call_id,
    )


class RowParser:
    """Parses row objects of one kind; holds the reference context and the image cap."""

    def __init__(
        self, kind: RowKind, ctx: RefContext, max_images_per_message: int | None = 1
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if max_images_per_message is not None and max_images_per_message < 0:
            raise ValueError("max_images_per_message must be >= 0 or None")
        self.kind = kind
        self.ctx = ctx
        self.cap = max_images_per_message

    def parse(self, obj: dict[str, Any], line: int) -> ParsedRow:
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict):
            raise RowError(
                f"must be an object (got {type_name(metadata)})",
                category="malformed metadata",
                field="metadata",
            )
        notes = _Notes()
        cache: dict[str, ImagePart] = {}  # chosen and rejected share prompt images
        legacy, has_legacy = legacy_images(obj)
        tools = parse_tools(obj.get("tools"))
        if self.kind == "preference":
            sides, dropped = [], 0
            for side in ("chosen", "rejected"):
                raw, where = self._side_messages(obj, side)
                sides.append(self._messages(raw, where, legacy, has_legacy, notes, cache))
                check_tool_turns(sides[-1], where, tools)
                if side == "chosen":  # the sides share their prompt: count its cuts once
                    dropped = notes.images_dropped
            chosen, rejected = sides
            self._check_preference(chosen, rejected)
            row: Row = PreferenceRow(line, chosen, rejected, metadata, tools)
            return ParsedRow(row, row_images(row), notes.warnings, dropped)
        raw, where = self._top_messages(obj)
        messages = self._messages(raw, where, legacy, has_legacy, notes, cache)
        check_tool_turns(messages, where, tools)
        images = sum(len(m.images) for m in messages)
        warnings, dropped = notes.warnings, notes.images_dropped
        if self.kind == "sft":
            if not any(m.role == "assistant" for m in messages):
                raise RowError(
                    "no assistant turn (an SFT row needs at least one)",
                    category="no assistant turn",
                    field=where,
                )
            return ParsedRow(SFTRow(line, messages, metadata, tools), images, warnings, dropped)
        if messages[-1].role not in ("user", "tool"):
            raise RowError(
                f"last turn is {messages[-1].role!r}; an RL prompt must end with a user turn "
                "(or a tool response)",
                category="RL prompt does not end with a user turn",
                field=f"{where}[{len(messages) - 1}]",
            )
        return ParsedRow(RLRow(line, messages, metadata, tools), images, warnings, dropped)

    def _top_messages(self, obj: dict[str, Any]) -> tuple[Any, str]:
        for key in ("messages", "conversations"):
            if key in obj and obj[key] is not None:
                return obj[key], key
        raise RowError(
            "row has no 'messages' (or ShareGPT 'conversations') array",
            category="missing messages",
            field="messages",
        )

    def _side_messages(self, obj: dict[str, Any], side: str) -> tuple[Any, str]:
        value = obj.get(side)
        if isinstance(value, list):
            return value, side
        if isinstance(value, dict) and value.get("messages") is not None:
            return value["messages"], f"{side}.messages"
        raise RowError(
            'missing (a preference row is {"chosen": {"messages": [...]}, '
            '"rejected": {"messages": [...]}})',
            category="missing chosen/rejected",
            field=side,
        )

    def _messages(
        self,
        raw: Any,
        where: str,
        legacy: list[RawImage],
        has_legacy: bool,
        notes: _Notes,
        cache: dict[str, ImagePart],
    ) -> list[Message]:
        if not isinstance(raw, list):
            raise RowError(
                f"must be an array of messages (got {type_name(raw)})",
                category="malformed messages",
                field=where,
            )
        if not raw:
            raise RowError("is empty", category="empty messages", field=where)
        parsed = [_parse_message(m, f"{where}[{i}]") for i, m in enumerate(raw)]
        if has_legacy:
            apply_legacy(parsed, legacy)
        elif any(PLACEHOLDER in p for m in parsed for p in m.parts if isinstance(p, str)):
            notes.warnings.append(
                f"{where}: text contains {PLACEHOLDER} but the row has no 'images' list; "
                "kept as literal text"
            )
        return [self._finish(m, notes, cache) for m in parsed]

    def _finish(self, m: _RawMessage, notes: _Notes, cache: dict[str, ImagePart]) -> Message:
        refs = [p for p in m.parts if isinstance(p, RawImage)]
        if refs and m.role == "assistant":
            raise RowError(
                "images are not allowed in assistant turns (the model cannot be trained to "
                "emit images)",
                category="image in an assistant turn",
                field=refs[0].field,
            )
        # System images are left to the renderer; the cap is about the conversation turns.
        if self.cap is not None and m.role != "system" and len(refs) > self.cap:
            cut = {id(r) for r in refs[self.cap :]}
            m.parts = [p for p in m.parts if id(p) not in cut]
            notes.images_dropped += len(cut)
            notes.warnings.append(
                f"{m.field}: {len(refs)} images in one message, over the cap of "
                f"{self.cap} per message; kept the first {self.cap}, "
                f"dropped {len(refs) - self.cap}"
            )
        # Only string content can still be blank here (blank text parts were refused).
        # A tool's output and a calling turn's text are kept as given, blank or not: the
        # template writes them verbatim (a calling turn's text decides a newline).
        verbatim = m.role == "tool" or bool(m.tool_calls)
        m.parts = [p for p in m.parts if not isinstance(p, str) or (p if verbatim else p.strip())]
        if not m.parts and not verbatim:
            raise _empty_text(m.content_field)
        parts: list[Part] = []
        for p in m.parts:
            if isinstance(p, str):
                parts.append(TextPart(p))
                continue
            image = cache.get(p.ref)
            if image is None:
                try:
                    image = resolve_image(p.ref, self.ctx)
                except RowError as exc:
                    raise exc.at(p.field) from None
                cache[p.ref] = image
            parts.append(image)
        return Message(m.role, parts, m.weight, m.tool_calls, m.tool_call_id)

    def _check_preference(self, chosen: list[Message], rejected: list[Message]) -> None:
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[-1].role != "assistant":
                raise RowError(
                    "must end with an assistant turn",
                    category="preference side does not end with an assistant turn",
                    field=f"{side}.messages",
                )
            if not any(m.role == "user" for m in msgs[:-1]):
                raise RowError(
                    "no user turn before the final assistant turn",
                    category="preference row without a prompt",
                    field=f"{side}.messages",
                )
        difference = _prompt_difference(chosen[:-1], rejected[:-1])
        if difference:
            raise RowError(
                f"chosen and rejected prompts differ ({difference})",
                category="chosen and rejected prompts differ",
            )


def _part_key(p: Part) -> tuple[str, str | bytes]:
    return ("text", p.text) if isinstance(p, TextPart) else ("image", p.data)


def _prompt_difference(a: list[Message], b: list[Message]) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} prompt messages"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.role != y.role:
            return f"messages[{i}] role {x.role!r} vs {y.role!r}"
        if (x.tool_calls, x.tool_call_id) != (y.tool_calls, y.tool_call_id):
            return f"messages[{i}] tool calls"
        if [_part_key(p) for p in x.parts] != [_part_key(p) for p in y.parts]:
            if [p.type for p in x.parts] != [p.type for p in y.parts]:
                return f"messages[{i}] content"
            return f"messages[{i}] {'text' if x.text != y.text else 'images'}"
    return ""


def parse_messages(
    messages: list[dict[str, Any]],
    *,
    kind: RowKind = "sft",
    base_dir: str | Path = ".",
    max_images_per_message: int | None = None,
) -> list[Message]:
    """OpenAI-style message dicts -> normalised ``Message`` list (for SDK users).

    The same parsing and image checks as a dataset row; raises ``RowError`` naming the
    field on bad input. Local image paths resolve under ``base_dir``.
    """
    ctx = RefContext(Path(base_dir).resolve())
    row = RowParser(kind, ctx, max_images_per_message).parse({"messages": messages}, line=0).row
    assert isinstance(row, SFTRow | RLRow)
    return row.messages
