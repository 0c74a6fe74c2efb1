"""What a pass over a dataset kept, dropped and warned about.

The JSON form (``to_dict``) is a stable contract: the CLI prints it with ``--json`` and
training writes it to ``runs/<name>/validation_report.json``. Categories (short stable
phrases) are kept beside it only to group thousands of reasons in the summary.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.atomic import atomic_write

_SHOWN_LINES = 5


def _grouped(
    entries: list[dict[str, Any]], key: str, categories: list[str], title: str
) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry, category in zip(entries, categories, strict=True):
        groups[category].append(entry)
    out = [title]
    for category, items in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines = ", ".join(str(e["line"]) for e in items[:_SHOWN_LINES])
        more = f", ... (+{len(items) - _SHOWN_LINES})" if len(items) > _SHOWN_LINES else ""
        label = "line" if len(items) == 1 else "lines"
        out.append(f"  {len(items):>7,}  {category}  ({label} {lines}{more})")
        if items[0][key] != category:
            out.append(f"           e.g. line {items[0]['line']}: {items[0][key]}")
    return out


@dataclass
class ValidationReport:
    """Counts plus every dropped row ``{line, reason}`` and warning ``{line, message}``."""

    path: str
    kind: str
    total: int = 0  # non-blank lines read
    valid: int = 0
    images: int = 0  # images kept in valid rows (after the per-message cap)
    images_dropped: int = 0  # cut by the per-message cap, or left out by the chat template
    dropped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    _drop_categories: list[str] = field(default_factory=list, repr=False, compare=False)
    _warning_categories: list[str] = field(default_factory=list, repr=False, compare=False)

    def drop(self, line: int, reason: str, category: str | None = None) -> None:
        self.dropped.append({"line": line, "reason": reason})
        self._drop_categories.append(category or reason)

    def warn(self, line: int, message: str, category: str | None = None) -> None:
        self.warnings.append({"line": line, "message": message})
        self._warning_categories.append(category or _warning_category(message))

    def reject(self, line: int, reason: str, category: str, images: int) -> None:
        """Move a row counted valid (it parsed) to dropped: it cannot be trained on."""
        self.valid -= 1
        self.images -= images
        self.drop(line, reason, category)

    @property
    def ok(self) -> bool:
        """True when no row was dropped."""
        return not self.dropped

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "total": self.total,
            "valid": self.valid,
            "images": self.images,
            "images_dropped": self.images_dropped,
            # By line: training finds render-time drops after the whole file is parsed,
            # `validate` row by row; the same drops must print the same.
            "dropped": [{"line": d["line"], "reason": d["reason"]} for d in _by_line(self.dropped)],
            "warnings": [
                {"line": w["line"], "message": w["message"]} for w in _by_line(self.warnings)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        report = cls(path=str(data["path"]), kind=str(data["kind"]))
        report.total, report.valid, report.images = data["total"], data["valid"], data["images"]
        report.images_dropped = int(data.get("images_dropped", 0))
        for d in data.get("dropped", []):
            report.drop(int(d["line"]), str(d["reason"]))
        for w in data.get("warnings", []):
            report.warn(int(w["line"]), str(w["message"]))
        return report

    def write_json(self, path: str | Path) -> None:
        """Write ``to_dict()`` atomically (a reader never sees half a report)."""
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")

    def summary_text(self) -> str:
        dropped = len(self.dropped)
        lines = [
            f"{self.path} ({self.kind})",
            f"  rows read: {self.total:,}   valid: {self.valid:,}   dropped: {dropped:,}   "
            f"images kept: {self.images:,}   images dropped: {self.images_dropped:,}   "
            f"warnings: {len(self.warnings):,}",
        ]
        if self.dropped:
            lines += _grouped(
                self.dropped, "reason", self._drop_categories, "dropped rows by reason:"
            )
        if self.warnings:
            lines += _grouped(self.warnings, "message", self._warning_categories, "warnings:")
        if self.total == 0:
            lines.append("  the file has no rows")
        elif not self.dropped:
            lines.append("  every row is valid")
        return "\n".join(lines)


def _by_line(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: e["line"])  # stable: a row's own order is kept


def _warning_category(message: str) -> str:
    # Warnings start with a field path ("messages[1]: ..."); group on what follows it.
    head, sep, rest = message.partition(": ")
    if sep and " " not in head:
        message = rest
    # Drop the per-row numbers so the same warning on many rows forms one group.
    if "images in one message" in message:
        return "images over the per-message cap (extra images dropped)"
    return message
