"""``tinker://<run>/<segment>/<name>``: where a checkpoint lives, as clients name it.

A checkpoint's kind is ``training`` (resumable state, segment ``weights``) or
``sampler`` (weights to sample from, segment ``sampler_weights``); this is the one
table between the two spellings.
"""

from __future__ import annotations

from typing import Literal

from vlmtune.protocol.errors import BadRequest, shown

SCHEME = "tinker://"
CheckpointKind = Literal["training", "sampler"]
SEGMENTS: dict[str, CheckpointKind] = {"weights": "training", "sampler_weights": "sampler"}
_SEGMENT_OF: dict[str, str] = {kind: segment for segment, kind in SEGMENTS.items()}


def is_tinker_path(ref: str) -> bool:
    return ref.startswith(SCHEME)


def checkpoint_id(kind: str, name: str) -> str:
    """``weights/<name>`` or ``sampler_weights/<name>``: a checkpoint within its run."""
    return f"{_SEGMENT_OF[kind]}/{name}"


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{run_id}/{checkpoint_id(kind, name)}"


def parse_tinker_path(ref: str) -> tuple[str, CheckpointKind, str]:
    """``tinker://run/weights/name`` -> (run id, kind, name), or ``BadRequest``."""
    parts = ref.removeprefix(SCHEME).split("/")
    if not is_tinker_path(ref) or len(parts) != 3 or parts[1] not in SEGMENTS:
        raise BadRequest(f"malformed checkpoint path {shown(ref)} (tinker://<run>/weights/<name>)")
    return parts[0], SEGMENTS[parts[1]], parts[2]


def checkpoint_name(ref: str, kind: str) -> str:
    """The name in ``<segment>/<name>`` (or a bare name) for a checkpoint of ``kind``."""
    return ref.removeprefix(f"{_SEGMENT_OF[kind]}/")
