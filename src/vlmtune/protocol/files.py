"""Uploaded files as both sides name them: a TOML job's ``data = "file-<id>"`` is an
upload (``POST /v1/files``), anything else a path."""

from __future__ import annotations

import re

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
DEFAULT_PURPOSE = "fine-tune"  # OpenAI's files API's word for training data


def is_file_id(value: str) -> bool:
    return bool(FILE_ID_RE.match(value))
