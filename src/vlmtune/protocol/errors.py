"""The two client errors a request can earn, raised while decoding it or serving it."""

from __future__ import annotations


class BadRequest(ValueError):
    """A client error: becomes HTTP 400 (or a failed future with category ``user``)."""


class NotFound(LookupError):
    """An unknown id: becomes HTTP 404."""
