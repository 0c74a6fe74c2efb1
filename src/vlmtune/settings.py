"""One resolved setting: what a job said, what runs instead, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SettingChange:
    """A job setting vlmtune changed (vision defaults, the hosted trainer's keys).

    Nothing is changed silently: every change is printed as ``key: old -> new (reason)``.
    """

    key: str
    old: Any
    new: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r} ({self.reason})"
