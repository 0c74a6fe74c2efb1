"""Report links a browser can open: a signed, expiring token in the URL, not a key.

A browser cannot send ``Authorization: Bearer``, and an API key in a URL would land in
browser history, proxy logs and screenshots with all of its power. A link token grants
one thing: ``GET`` of the one path it was made for (a job's or a run's report page), as the key
that asked for it (its tenant, or an operator), until it expires (``LINK_TTL_S``).

    GET /v1/jobs/<id>/report_link   (with a key)  -> {"url": ".../report?token=...", ...}
    GET /v1/jobs/<id>/report?token=...            -> the page, no key

The token is ``<expires>.<operator 0|1>.<tenant>.<signature>``, the signature an
HMAC-SHA256 of the path and those fields under a random secret kept in the server's
data directory (``report-links.key``, mode 0600), so links survive a restart and
revoking every link is deleting that file. Tenancy still applies: the route looks the
job up with the token's tenant, as for a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs

from vlmtune.server.auth import Identity, Scope

LINK_TTL_S = 24 * 3600  # a day: long enough to watch a run, short enough to expire
SECRET_FILE = "report-links.key"
TOKEN_PARAM = "token"
LINK_METHODS = frozenset({"GET", "HEAD"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def load_secret(data_dir: Path) -> bytes:
    """The data directory's link secret, made (0600) the first time."""
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        secret = secrets.token_bytes(32)
        f.write(secret.hex() + "\n")
    return secret


class ReportLinks:
    """Makes and checks link tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def _signature(self, path: str, fields: str) -> str:
        return _b64(hmac.new(self.secret, f"{path}\n{fields}".encode(), hashlib.sha256).digest())

    def token(
        self, path: str, who: Identity, ttl_s: float = LINK_TTL_S, now: float | None = None
    ) -> tuple[str, int]:
        """(a token for ``GET path`` as ``who``, when it expires in epoch seconds)."""
        expires = int((time.time() if now is None else now) + ttl_s)
        fields = f"{expires}.{int(who.operator)}.{who.tenant}"
        return f"{fields}.{self._signature(path, fields)}", expires

    def check(self, path: str, token: str, now: float | None = None) -> Identity | str:
        """The identity ``token`` grants for ``path``, or why it grants none."""
        fields, _, signature = token.rpartition(".")
        expires, _, rest = fields.partition(".")
        operator, _, tenant = rest.partition(".")
        if not (expires.isdigit() and operator in ("0", "1") and tenant):
            return "malformed report link token"
        if not hmac.compare_digest(signature, self._signature(path, fields)):
            return "this report link is not valid for this page (or this server)"
        if int(expires) < (time.time() if now is None else now):
            return (
                "this report link has expired: ask for a new one "
                "(vlmtune jobs report <id>, or vlmtune runs report <run id>)"
            )
        return Identity(tenant, operator == "1")

    def check_scope(self, scope: Scope) -> Identity | str | None:
        """For a request without a key: the identity its ``?token=`` grants, why it
        grants none, or None when it carries no token (or is not a GET)."""
        if scope.get("method") not in LINK_METHODS:
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        tokens = query.get(TOKEN_PARAM)
        if not tokens:
            return None
        return self.check(scope["path"], tokens[0])
