"""Chat messages -> ``ModelInput`` + per-token loss weights, exactly as Qwen3-VL's template.

The conversation is laid out as the official Qwen3-VL-Instruct chat template does
(no default system prompt; a system message only counts when it comes first; images
only in user turns; assistant turns contribute their text), then the whole string is
tokenized in one call, as the HF processor does, so the ids are identical to
``processor(text=processor.apply_chat_template(...), images=...)``. Character spans
carry the weights onto tokens through the tokenizer's offsets.

Tools (OpenAI function specs) go in the system turn's ``# Tools`` block; an assistant
turn's calls follow its content as ``<tool_call>`` blocks; consecutive ``tool`` turns
share one user turn of ``<tool_response>`` blocks (images in them count as user images).
The strings come from ``vlmtune.tool_calls``.

Weights: prompt 0, image 0, an assistant turn's content, its tool calls and its
closing ``<|im_end|>`` get the turn's weight (so the model learns to call and to
stop); the ``<|im_start|>assistant\\n`` header, the newline after ``<|im_end|>`` and
tool responses get 0.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vlmtune.data.errors import RowError
from vlmtune.data.schema import ImagePart, Message, TextPart
from vlmtune.models.vision import ImagePreprocessor
from vlmtune.tool_calls import assistant_text, format_call, tools_system_text
from vlmtune.types import Datum, EncodedTextChunk, ImageChunk, ModelInput, TensorData

TrainOn = Literal["all_assistant", "last_assistant"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


@dataclass
class Rendered:
    model_input: ModelInput
    weights: list[float]  # one per position of model_input
    images_dropped: int = 0

    @property
    def length(self) -> int:
        return self.model_input.length

    @property
    def num_weighted_tokens(self) -> int:
        return sum(1 for w in self.weights if w > 0)


def image_format(mime: str) -> str:
    """ "image/jpeg" -> "jpeg" (the ImageChunk format)."""
    sub = mime.split("/", 1)[-1].lower()
    return {"jpg": "jpeg", "x-png": "png"}.get(sub, sub)


def split_prompt_and_answer(messages: list[Message]) -> tuple[list[Message], str]:
    """Split off a trailing assistant turn: (prompt messages, its text as the model
    writes it, tool calls included). No answer -> ""."""
    if messages and messages[-1].role == "assistant":
        last = messages[-1]
        return list(messages[:-1]), assistant_text(last.text, last.tool_calls)
    return list(messages), ""


def to_hf_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The HF chat-template form of messages (images as ``{"type": "image"}`` parts)."""
    out = []
    for m in messages:
        content: list[dict[str, Any]] = []
        for p in m.parts:
            if isinstance(p, TextPart):
                content.append({"type": "text", "text": p.text})
            else:
                content.append({"type": "image"})
        hf: dict[str, Any] = {"role": m.role, "content": content}
        if m.tool_calls:
            hf["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            hf["tool_call_id"] = m.tool_call_id
        out.append(hf)
    return out


class Renderer:
    """Renders conversations for one tokenizer and one image preprocessor.

    ``max_images_per_message``: images beyond the first N of a message are dropped and
    counted (None: no cap). Images the template itself ignores (in system or assistant
    turns) are counted as dropped too, so nothing disappears unreported.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_preprocessor: ImagePreprocessor,
        max_images_per_message: int | None = 1,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_preprocessor = image_preprocessor
        self.max_images_per_message = max_images_per_message
        self.image_token_id = self._id(IMAGE_PAD)
        self.im_end_id = self._id(IM_END)
        self.endoftext_id = self._id(ENDOFTEXT)

    @classmethod
    def from_processor(
        cls,
        processor: Any,
        image_preprocessor: ImagePreprocessor | None = None,
        max_images_per_message: int | None = 1,
    ) -> Renderer:
        ip = image_preprocessor or ImagePreprocessor.from_processor(processor)
        return cls(processor.tokenizer, ip, max_images_per_message)

    def _id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", -1):
            raise ValueError(f"tokenizer has no {token} token: not a Qwen3-VL tokenizer?")
        return int(token_id)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.im_end_id, self.endoftext_id]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- layout -------------------------------------------------------------------------

    def _layout(
        self,
        messages: list[Message],
        train_on: TrainOn,
        generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        prefill: str = "",
    ) -> tuple[list[tuple[str, float]], list[tuple[ImagePart, int]], int]:
        """(text pieces with weights, kept images and their token counts, images dropped).

        Raises ``RowError`` (a ``ValueError``) for a conversation that cannot be rendered:
        a chat control token in the text, or an image the processor refuses.
        """
        if train_on not in ("all_assistant", "last_assistant"):
            raise ValueError(
                f"train_on must be 'all_assistant' or 'last_assistant', got {train_on!r}"
            )
        _check_no_control_tokens(messages, tools or [], prefill)
        pieces: list[tuple[str, float]] = []
        images: list[tuple[ImagePart, int]] = []
        dropped = 0
        last_assistant = max(
            (i for i, m in enumerate(messages) if m.role == "assistant"), default=-1
        )
        # The template reads the system prompt from the first message only.
        system = messages[0].text if messages and messages[0].role == "system" else None
        if tools:
            pieces.append((f"{IM_START}system\n{tools_system_text(system, tools)}{IM_END}\n", 0.0))
        elif system is not None:
            pieces.append((f"{IM_START}system\n{system}{IM_END}\n", 0.0))
        for i, m in enumerate(messages):
            if m.role == "system":
                dropped += len(m.images)  # the template keeps a system turn's text only
            elif m.role == "user":
                pieces.append((f"{IM_START}user\n", 0.0))
                dropped += self._content(m, i, pieces, images)
                pieces.append((f"{IM_END}\n", 0.0))
            elif m.role == "tool":  # a run of tool turns is one user turn
                if i == 0 or messages[i - 1].role != "tool":
                    pieces.append((f"{IM_START}user", 0.0))
                pieces.append(("\n<tool_response>\n", 0.0))
                dropped += self._content(m, i, pieces, images)
                pieces.append(("\n</tool_response>", 0.0))
                if i == len(messages) - 1 or messages[i + 1].role != "tool":
                    pieces.append((f"{IM_END}\n", 0.0))
            elif m.role == "assistant":
                dropped += len(m.images)
                weight = 1.0 if m.weight is None else float(m.weight)
                if train_on == "last_assistant" and i != last_assistant:
                    weight = 0.0
                pieces.append((f"{IM_START}assistant\n", 0.0))
                pieces.append((f"{assistant_text(m.text, m.tool_calls)}{IM_END}", weight))
                pieces.append(("\n", 0.0))
            else:
                raise ValueError(f"unsupported role {m.role!r}")
        if generation_prompt:
            pieces.append((f"{IM_START}assistant\n{prefill}", 0.0))
        return pieces, images, dropped

    def _content(
        self,
        m: Message,
        i: int,
        pieces: list[tuple[str, float]],
        images: list[tuple[ImagePart, int]],
    ) -> int:
        """Append a user or tool turn's text and image slots (weight 0); the images over
        the per-message cap are left out and counted (returned)."""
        n_images = dropped = 0
        for p in m.parts:
            if isinstance(p, TextPart):
                pieces.append((p.text, 0.0))
            elif self.max_images_per_message is None or n_images < self.max_images_per_message:
                n_images += 1
                images.append((p, self._image_tokens(p, i)))
                pieces.append((f"{VISION_START}{IMAGE_PAD}{VISION_END}", 0.0))
            else:
                dropped += 1
        return dropped

    def _image_tokens(self, image: ImagePart, message: int) -> int:
        try:
            return self.image_preprocessor.num_tokens(image.width, image.height)
        except ValueError as e:  # e.g. an aspect ratio beyond the processor's limit
            # A data URL's source is its own bytes: the message already gives the size.
            shown = image.source and not image.source.startswith("data:")
            where = f" ({image.source})" if shown else ""
            raise RowError(
                f"image{where}: {e}",
                category="image the processor refuses",
                field=f"messages[{message}]",
            ) from None

    def _tokenize(
        self, pieces: list[tuple[str, float]], images: list[tuple[ImagePart, int]], dropped: int
    ) -> Rendered:
        text = "".join(t for t, _ in pieces)
        starts: list[int] = []
        piece_weights: list[float] = []
        pos = 0
        for t, w in pieces:
            starts.append(pos)
            piece_weights.append(w)
            pos += len(t)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        chunks: list[EncodedTextChunk | ImageChunk] = []
        weights: list[float] = []
        run: list[int] = []
        image_iter = iter(images)
        for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if token_id == self.image_token_id:
                image, n = next(image_iter)
                if run:
                    chunks.append(EncodedTextChunk(tokens=run))
                    run = []
                chunks.append(
                    ImageChunk(data=image.data, format=image_format(image.mime), expected_tokens=n)
                )
                weights.extend([0.0] * n)
                continue
            # A token takes the weight of the piece holding its last character, so a token
            # that straddles the assistant header and the answer counts as answer.
            char = max(end - 1, start)
            weights.append(piece_weights[bisect.bisect_right(starts, char) - 1])
            run.append(int(token_id))
        if run:
            chunks.append(EncodedTextChunk(tokens=run))
        return Rendered(ModelInput(chunks=chunks), weights, dropped)

    # -- public -------------------------------------------------------------------------

    def render(
        self,
        messages: list[Message],
        train_on: TrainOn = "all_assistant",
        tools: list[dict[str, Any]] | None = None,
    ) -> Rendered:
        """A whole conversation for training, with per-token weights."""
        return self._tokenize(*self._layout(messages, train_on, False, tools))

    def render_prompt(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        prefill: str = "",
    ) -> Rendered:
        """The conversation plus ``<|im_start|>assistant\\n``, for sampling (weights all 0).

        ``prefill``: text the assistant turn starts with, tokenized with the prompt (the
        server forces a tool call this way); the sample continues it.
        Raises if the messages end with an assistant turn: strip it first with
        ``split_prompt_and_answer``.
        """
        if messages and messages[-1].role == "assistant":
            raise ValueError(
                "render_prompt: the conversation ends with an assistant turn; "
                "strip it with split_prompt_and_answer(messages) first"
            )
        pieces, images, dropped = self._layout(messages, "all_assistant", True, tools, prefill)
        pieces = [(t, 0.0) for t, _ in pieces]
        return self._tokenize(pieces, images, dropped)


# Chat-structure tokens: written as text inside a message they would be tokenized as the
# real thing (an extra turn boundary, or an image slot with no image behind it).
CONTROL_TOKENS = (
    IM_START,
    IM_END,
    ENDOFTEXT,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    "<|video_pad|>",
    "<|vision_pad|>",
)


def _check_no_control_tokens(
    messages: list[Message], tools: list[dict[str, Any]], prefill: str = ""
) -> None:
    texts = [(f"tools[{k}]", json.dumps(t, ensure_ascii=False)) for k, t in enumerate(tools)]
    texts.append(("prefill", prefill))
    for i, m in enumerate(messages):
        where = f"messages[{i}] ({m.role})"
        texts.extend((where, p.text) for p in m.parts if isinstance(p, TextPart))
        texts.extend((f"{where} tool_calls", format_call(c)) for c in m.tool_calls)
    for where, text in texts:
        for tok in CONTROL_TOKENS:
            if tok in text:
                raise RowError(
                    f"text contains the control token {tok}",
                    category="text contains a chat control token",
                    field=where,
                )


def datum_from_rendered(rendered: Rendered, image_token_id: int) -> Datum:
    """Next-token Datum: input = positions[:-1], targets = ids[1:], weights = weights[1:]."""
    ids = rendered.model_input.to_ints(image_token_id)
    chunks = list(rendered.model_input.chunks)
    if not chunks or not isinstance(chunks[-1], EncodedTextChunk):
        raise ValueError("a rendered conversation must end with text, not an image")
    last = chunks[-1]
    if len(last.tokens) > 1:
        chunks[-1] = EncodedTextChunk(tokens=last.tokens[:-1])
    else:
        chunks.pop()
    return Datum(
        model_input=ModelInput(chunks=chunks),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(np.asarray(ids[1:], dtype=np.int64)),
            "weights": TensorData.from_numpy(np.asarray(rendered.weights[1:], dtype=np.float32)),
        },
        images_dropped=rendered.images_dropped,
    )
