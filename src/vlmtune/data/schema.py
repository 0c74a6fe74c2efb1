"""Normalised row types: what the data layer yields after validation.

Every image reference has been resolved and decoded once (so it is known to be
valid); the parts keep the encoded bytes, not pixels, so a whole dataset stays small
in memory. Rendering and the engine decode again (``vlmtune.data.images.decode_image``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """A decoded-and-checked image. ``width``/``height`` are after EXIF orientation."""

    data: bytes  # the encoded bytes as found (PNG/JPEG/WebP/GIF)
    mime: str  # e.g. "image/png", from the decoded bytes
    width: int
    height: int
    source: str = ""  # where it came from (shortened), for reports
    type: Literal["image"] = "image"


Part = TextPart | ImagePart


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant turn (OpenAI's ``tool_calls`` entry).

    ``arguments`` is the JSON text exactly as the chat template writes it: a string the
    row gave is kept verbatim, an object is serialised as the template's ``tojson``
    does (``json.dumps``, key order kept, ``ensure_ascii=False``). Always a JSON object.
    """

    name: str
    arguments: str
    id: str | None = None


@dataclass
class Message:
    role: Role
    parts: list[Part]
    weight: float | None = None  # None: the train_on policy decides; 0 excludes the turn
    tool_calls: list[ToolCall] = field(default_factory=list)  # assistant turns only
    tool_call_id: str | None = None  # tool turns only: the call this answers

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass
class SFTRow:
    line: int  # 1-based line number in the source file
    messages: list[Message]
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function specs


@dataclass
class PreferenceRow:
    line: int
    chosen: list[Message]
    rejected: list[Message]
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function specs


@dataclass
class RLRow:
    line: int
    messages: list[Message]  # ends with a user turn
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function specs


Row = SFTRow | PreferenceRow | RLRow
RowKind = Literal["sft", "preference", "rl"]


def row_images(row: Row) -> int:
    """Images a row shows the model; a preference pair's shared prompt counts once."""
    if isinstance(row, PreferenceRow):
        return sum(len(m.images) for m in row.chosen) + len(row.rejected[-1].images)
    return sum(len(m.images) for m in row.messages)
