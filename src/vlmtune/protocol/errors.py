"""The two client errors a request can earn, raised while decoding it or serving it."""

from __future__ import annotations


class BadRequest(ValueError):
    """A client error: becomes HTTP 400 (or a failed future with category ``user``)."""


class NotFound(LookupError):
    """An unknown id: becomes HTTP 404."""


# Long enough for any real id or path; short enough that echoing an attacker's 60 MB
# string back costs nothing.
SHOWN_CHARS = 200
# A whole error message (it may list several problems, each naming a field).
MESSAGE_CHARS = 2000


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters with its full
    length named: ``'abc'... (60,000,000 chars)``."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} chars)"


def clipped(message: str, limit: int = MESSAGE_CHARS) -> str:
    """A whole message cut to ``limit`` characters (the net under every error that echoes
    user input, whether or not its author used ``shown``)."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message):,} chars)"
