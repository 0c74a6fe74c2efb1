"""API keys' rows: salted digests, never the keys (``server/auth.py`` hashes them)."""

from __future__ import annotations

import time
from typing import Any

from vlmtune.server.store.db import Db


def add_api_key(
    db: Db, kid: str, salt: bytes, digest: bytes, label: str, tenant: str, operator: bool
) -> None:
    db.insert(
        "api_keys", kid=kid, salt=salt, digest=digest, label=label, created=time.time(),
        tenant=tenant, operator=int(operator),
    )  # fmt: skip


def api_key(db: Db, kid: str) -> dict[str, Any] | None:
    return db.one("SELECT * FROM api_keys WHERE kid = ?", (kid,))


def api_keys(db: Db) -> list[dict[str, Any]]:
    return db.all(
        "SELECT kid, label, created, revoked, tenant, operator FROM api_keys ORDER BY created"
    )


def active_key_count(db: Db) -> int:
    return db.count("SELECT COUNT(*) AS n FROM api_keys WHERE revoked = 0")


def revoke_api_key(db: Db, kid: str) -> bool:
    return bool(db.update("api_keys", {"kid": kid}, revoked=1))
