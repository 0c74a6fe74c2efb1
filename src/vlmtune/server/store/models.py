"""What is served: promoted models, and deployments (``server/deployments.py``) with what
each has hot-loaded, keyed by tenant as account ids are."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from vlmtune.server.store.db import Db, owned

# What a deployment's owner may change (``update_deployment``): tenant, id, base model and
# created never change.
_DEPLOYMENT_COLUMNS = frozenset(
    {"config", "generation", "loaded_identity", "loaded_run", "loaded_path", "load_target",
     "load_error", "updated"}
)  # fmt: skip


# ---- promoted models ----------------------------------------------------------------
def add_model(db: Db, model_id: str, path: str, base_model: str, source: dict, tenant: str) -> None:
    db.insert("models", id=model_id, path=path, base_model=base_model, source=source,
              created=time.time(), tenant=tenant)  # fmt: skip


def model(db: Db, model_id: str, tenant: str | None) -> dict[str, Any] | None:
    where, params = owned(tenant)
    return db.one("SELECT * FROM models WHERE id = ?" + where, (model_id, *params))


def models(db: Db, tenant: str | None) -> list[dict[str, Any]]:
    return db.all(
        "SELECT * FROM models WHERE tenant = COALESCE(?, tenant) ORDER BY created", (tenant,)
    )


# ---- deployments --------------------------------------------------------------------
def add_deployment(
    db: Db, tenant: str, deployment_id: str, base_model: str, config: dict[str, Any]
) -> bool:
    now = time.time()
    try:
        db.insert(
            "deployments", tenant=tenant, id=deployment_id, base_model=base_model,
            config=config, created=now, updated=now,
        )  # fmt: skip
    except sqlite3.IntegrityError:
        return False
    return True


def deployment(db: Db, tenant: str, deployment_id: str) -> dict[str, Any] | None:
    return db.one("SELECT * FROM deployments WHERE tenant = ? AND id = ?", (tenant, deployment_id))


def update_deployment(db: Db, tenant: str, deployment_id: str, **values: Any) -> None:
    unknown = set(values) - _DEPLOYMENT_COLUMNS
    if unknown:
        raise ValueError(f"deployments has no columns {sorted(unknown)}")
    db.update("deployments", {"tenant": tenant, "id": deployment_id}, **values)


def delete_deployment(db: Db, tenant: str, deployment_id: str) -> bool:
    return bool(
        db.execute("DELETE FROM deployments WHERE tenant = ? AND id = ?", (tenant, deployment_id))
    )
