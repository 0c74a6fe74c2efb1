"""Helpers every task shares: frames as data URLs, prompts, and answer parsing."""

from __future__ import annotations

import io
import re
import zlib

import numpy as np
from PIL import Image

from vlmtune.data.refs import data_url
from vlmtune.tasks.protocol import Messages

# An answer naming more words than this is an essay, not a choice: parse refuses it, so a
# model cannot hedge by listing several actions inside a long text.
MAX_ANSWER_WORDS = 8
_WORD = re.compile(r"[a-z0-9_]+")


def frame_url(frame_H_W_3: np.ndarray) -> str:
    """An RGB uint8 frame as a PNG ``data:`` URL (lossless, so a frame hashes the same
    every time it is encoded)."""
    buf = io.BytesIO()
    # compress_level 1: frames are small, and encoding is on the hot path of every step.
    Image.fromarray(np.ascontiguousarray(frame_H_W_3, dtype=np.uint8), "RGB").save(
        buf, format="PNG", compress_level=1
    )
    return data_url(buf.getvalue(), "image/png")


def observation_prompt(system: str, image: str, text: str, image_only: bool) -> Messages:
    """System turn, then a user turn with the frame and (unless ``image_only``) the text."""
    user: list[dict[str, object]] = [{"type": "image_url", "image_url": {"url": image}}]
    if not image_only:
        user.append({"type": "text", "text": text})
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]


def one_action(completion: str, actions: list[str]) -> str | None:
    """The single action a short answer names, or None.

    Accepted: at most ``MAX_ANSWER_WORDS`` words (runs of letters, digits and ``_``,
    compared lower-case), of which the ones that are action names all name the same
    action. So ``"Red."``, ``"the answer is red"`` and ``"red, red"`` are ``red``;
    ``"red or green"``, ``""`` and a long text are None. Action names are whole words:
    ``"reddish"`` is not ``red``.
    """
    words = _WORD.findall(completion.lower())
    if len(words) > MAX_ANSWER_WORDS:
        return None
    named = {w for w in words if w in actions}
    return named.pop() if len(named) == 1 else None


def split_seed(seed: int, split: str) -> list[int]:
    """An RNG seed for (seed, split): the same seed in two splits is two episodes."""
    return [seed, zlib.crc32(split.encode())]
