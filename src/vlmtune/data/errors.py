"""Errors the data layer raises for one bad row or one bad image.

A ``RowError`` never escapes the loader: it becomes a dropped row with its message as
the reason. ``category`` is a short stable phrase so a report can group thousands of
drops whose messages differ only by field path or URL.
"""

from __future__ import annotations


class RowError(ValueError):
    """A row (or one of its fields) is invalid; ``str(err)`` is the report reason."""

    def __init__(self, message: str, *, category: str | None = None, field: str = "") -> None:
        self.field = field
        self.detail = message
        self.category = category or message
        super().__init__(f"{field}: {message}" if field else message)

    def at(self, field: str) -> RowError:
        """The same error located at ``field`` (prefixing an inner path, if any)."""
        path = field + (
            "." + self.field if self.field and not self.field.startswith("[") else self.field
        )
        return RowError(self.detail, category=self.category, field=path)


class ImageError(RowError):
    """Image bytes that cannot be used (unsupported, corrupt, truncated, too large)."""


def type_name(value: object) -> str:
    """The JSON name of a parsed value's type, for reasons ("got array")."""
    if value is None:
        return "null"
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number"}
    return names.get(type(value), "number" if isinstance(value, float) else type(value).__name__)
