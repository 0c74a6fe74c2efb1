"""API keys and the two gates every request passes before any handler runs.

A key looks like ``tml-<kid>_<secret>`` (the ``tinker`` client refuses keys without the
``tml-`` prefix); ``fw_<kid>_<secret>`` is the same key spelled as the Fireworks client
expects (it refuses ``tml-`` keys on some paths), accepted wherever the other is. Only ``kid`` (a public id, used to find the row) and an HMAC-SHA256
of the whole key under a per-key random salt are stored; verification recomputes the
HMAC and compares with ``hmac.compare_digest`` so timing does not leak the digest.

The ASGI middleware rejects a missing or wrong key with 401 before the body is read,
and a body over the size limit with 413 while it streams, so neither touches state.

Every key speaks for a tenant (``default`` unless told), which owns what the key
creates and sees nothing of other tenants'; an operator key sees and acts on all. The
gate puts the key's ``Identity`` in the request scope (``context.caller`` reads it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.server.store import Store

if TYPE_CHECKING:
    from starlette.datastructures import State

KEY_PREFIX = "tml-"
FIREWORKS_PREFIX = "fw_"  # the same key, spelled for the Fireworks training client
# Paths that answer without a key (load balancers and clients probe them).
PUBLIC_PATHS = frozenset({"/healthz", "/api/v1/healthz", "/v1/health"})
DEFAULT_TENANT = "default"
# In an API-keys file, this tenant field marks an operator key (its own objects go to
# the default tenant).
OPERATOR_FIELD = "*"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
IDENTITY_SCOPE_KEY = "vlmtune.identity"  # where the gate puts the verified key's Identity

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Identity:
    """Who a verified key speaks for."""

    tenant: str  # owns what the key creates
    operator: bool = False  # sees and acts on every tenant's objects

    @property
    def sees(self) -> str | None:
        """The tenant whose objects the key may reach; None: every tenant's (an operator)."""
        return None if self.operator else self.tenant


def check_tenant(name: str) -> str:
    if not TENANT_RE.match(name):
        raise ValueError(
            f"tenant {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    return name


def _digest(salt: bytes, key: str) -> bytes:
    return hmac.new(salt, key.encode(), hashlib.sha256).digest()


def canonical_key(key: str) -> str:
    """``key`` in its ``tml-`` spelling (the one whose HMAC is stored)."""
    if key.startswith(FIREWORKS_PREFIX):
        return KEY_PREFIX + key[len(FIREWORKS_PREFIX) :]
    return key


def fireworks_spelling(key: str) -> str:
    """``tml-<kid>_<secret>`` as ``fw_<kid>_<secret>`` (one key, two spellings)."""
    return FIREWORKS_PREFIX + canonical_key(key).removeprefix(KEY_PREFIX)


def _split(key: str) -> str | None:
    """The key's public id, or None if it is not shaped like one of ours."""
    key = canonical_key(key)
    if not key.startswith(KEY_PREFIX) or "_" not in key:
        return None
    kid = key[len(KEY_PREFIX) :].split("_", 1)[0]
    return kid if 4 <= len(kid) <= 32 and kid.isalnum() else None


def create_key(
    store: Store, label: str = "", tenant: str = DEFAULT_TENANT, operator: bool = False
) -> str:
    """Make a key, store its salted HMAC, and return the key (shown once, never stored)."""
    check_tenant(tenant)
    kid = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{kid}_{secrets.token_urlsafe(32)}"
    salt = secrets.token_bytes(16)
    store.add_api_key(kid, salt, _digest(salt, key), label, tenant, operator)
    return key


def hashed_line(key: str, tenant: str = DEFAULT_TENANT, operator: bool = False) -> str:
    """``kid:salt_hex:digest_hex[:tenant]`` for an API-keys file that must not hold plain
    keys (the tenant field is ``*`` for an operator key, left out for the default one)."""
    kid = _split(key)
    if kid is None:
        raise ValueError(f"not a vlmtune API key (expected {KEY_PREFIX}<id>_<secret>)")
    salt = secrets.token_bytes(16)
    line = f"{kid}:{salt.hex()}:{_digest(salt, canonical_key(key)).hex()}"
    if operator:
        return f"{line}:{OPERATOR_FIELD}"
    return line if tenant == DEFAULT_TENANT else f"{line}:{check_tenant(tenant)}"


def _file_identity(field: str | None) -> Identity:
    """The identity a keys-file tenant field names (None: the default tenant)."""
    if field is None:
        return Identity(DEFAULT_TENANT)
    if field == OPERATOR_FIELD:
        return Identity(DEFAULT_TENANT, operator=True)
    return Identity(check_tenant(field))


class KeyChecker:
    """Verifies keys against the database and an optional keys file."""

    def __init__(self, store: Store, keys_file: str | Path | None = None) -> None:
        self.store = store
        self.file_keys: dict[str, list[tuple[bytes, bytes, Identity]]] = {}
        if keys_file is not None:
            self._load_file(Path(keys_file))

    def _load_file(self, path: Path) -> None:
        # Lines: ``[tenant:]<plain key>`` (hashed here, in memory) or
        # ``kid:salt_hex:digest_hex[:tenant]``; a tenant of ``*`` is an operator key.
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                self._add_file_line(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None

    def _add_file_line(self, line: str) -> None:
        field, _, rest = line.partition(":")
        line, rest = canonical_key(line), canonical_key(rest)
        if line.startswith(KEY_PREFIX) or rest.startswith(KEY_PREFIX):
            tenant, key = (None, line) if line.startswith(KEY_PREFIX) else (field, rest)
            kid = _split(key)
            if kid is None:
                raise ValueError("malformed key")
            salt = secrets.token_bytes(16)
            self.file_keys.setdefault(kid, []).append(
                (salt, _digest(salt, key), _file_identity(tenant))
            )
            return
        parts = line.split(":")
        if len(parts) not in (3, 4):
            raise ValueError("expected [tenant:]<key> or kid:salt_hex:digest_hex[:tenant]")
        who = _file_identity(parts[3] if len(parts) == 4 else None)
        self.file_keys.setdefault(parts[0], []).append(
            (bytes.fromhex(parts[1]), bytes.fromhex(parts[2]), who)
        )

    def identify(self, key: str | None) -> Identity | None:
        """The identity of a valid key; None for a missing, malformed, wrong or revoked one."""
        if not key:
            return None
        key = canonical_key(key)
        kid = _split(key)
        if kid is None:
            return None
        candidates = list(self.file_keys.get(kid, []))
        row = self.store.api_key(kid)
        if row is not None and not row["revoked"]:
            who = Identity(row["tenant"], bool(row["operator"]))
            candidates.append((row["salt"], row["digest"], who))
        found = None
        for salt, digest, who in candidates:  # every candidate is compared: constant work
            if hmac.compare_digest(_digest(salt, key), digest) and found is None:
                found = who
        return found

    def check(self, key: str | None) -> bool:
        return self.identify(key) is not None


def key_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-api-key":
            return value.decode("latin-1").strip()
        if lname == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return None


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the limit (the app maps it to 413)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"request body of {size:,}+ bytes exceeds the server limit of {limit:,} bytes "
            "(--max-body-mb); send fewer or smaller images per request"
        )


class GateMiddleware:
    """401 for a missing/wrong key, 413 for an oversized body; both before any handler."""

    # The wrapped FastAPI app's, set by ``create_app``: callers holding this outer app
    # reach the server context through it.
    state: State

    def __init__(
        self,
        app: ASGIApp,
        checker: KeyChecker,
        max_body_bytes: int,
        links: Callable[[Scope], Identity | str | None] | None = None,
    ) -> None:
        self.app = app
        self.checker = checker
        self.max_body = max_body_bytes
        # A request with no key may carry a report link's token (report_links.py): the
        # identity it grants for that one path, why it grants none, or None (no token).
        self.links = links

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in PUBLIC_PATHS:
            key = key_from_headers(scope.get("headers", []))
            identity = self.checker.identify(key)
            link = self.links(scope) if key is None and self.links is not None else None
            if identity is None and isinstance(link, Identity):
                identity = link
            if identity is None:
                why = link or "missing or invalid API key (send Authorization: Bearer <key>)"
                await _send_json(send, 401, {"detail": why})
                return
            scope = dict(scope)
            scope[IDENTITY_SCOPE_KEY] = identity
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, {"detail": self._too_large(int(length))})
            return
        seen = 0
        started = False

        async def counting_receive() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(seen, self.max_body)
            return message

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as e:
            if not started:  # a chunked body that outgrew the limit while streaming
                await _send_json(send, 413, {"detail": str(e)})

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size:,} bytes exceeds the server limit of {self.max_body:,} bytes "
            "(--max-body-mb); send fewer or smaller images per request"
        )
