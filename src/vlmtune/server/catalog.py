"""The models this server serves for chat: promoted ones and the base models on this machine.

A checkpoint becomes a model by promotion: a row in the store that points at its
directory (a job's ``final/``, or a sampler checkpoint of a trainer job's run). A
base model is served when its weights are on this machine (the server never
downloads). ``/v1/models`` lists both; ``/v1/chat/completions`` names one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtune.engine.engine import TrainingEngine
from vlmtune.engine.inference import load_inference_engine
from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.server.run_config import engine_config
from vlmtune.server.store import Store

MODEL_ID_RE = re.compile(r"^[a-z0-9-]{1,63}$")
# A hosted service's model resource name: accounts/<account>/models/<id>; the account
# is a tenant, or the service's own for base models.
HOSTED_MODEL_RE = re.compile(r"accounts/([^/]+)/models/([^/]+)")
HOSTED_BASE_ACCOUNT = "fireworks"
_AVAILABLE: tuple[float, list[tuple[str, int | None]]] = (0.0, [])


def available_base_models() -> list[tuple[str, int | None]]:
    """(name, context length) of the registry models whose weights are on this machine.

    Cached for a minute: looking in the Hugging Face cache costs a few file lookups
    per model, and ``/v1/models`` may be polled.
    """
    global _AVAILABLE
    from vlmtune.models.loading import resolve_model_path
    from vlmtune.models.registry import list_models

    if time.monotonic() - _AVAILABLE[0] < 60:
        return _AVAILABLE[1]
    out: list[tuple[str, int | None]] = []
    for spec in list_models():
        try:
            resolve_model_path(spec.name)
        except (FileNotFoundError, OSError, ValueError):
            continue
        out.append((spec.name, 4096 if spec.min_gpus == 0 else 262144))
    _AVAILABLE = (time.monotonic(), out)
    return out


def model_name(text: str) -> str:
    """A valid model id made from free text (a job's name)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return name or "model"


def unique_model_id(store: Store, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... whichever is free."""
    candidate, n = name, 1
    while store.model(candidate):
        n += 1
        candidate = f"{name[: 63 - len(str(n)) - 1]}-{n}"
    return candidate


# Model ids are one namespace across tenants (chat names a model by id alone), so a
# taken id is refused whoever owns it; only the owner (or an operator) can use it.
def check_new_model_id(store: Store, model_id: str) -> None:
    if not MODEL_ID_RE.match(model_id):
        raise BadRequest(f"model id {model_id!r}: use 1-63 characters of a-z, 0-9 and -")
    if store.model(model_id):
        raise BadRequest(f"model {model_id!r} already exists")


def add_model(
    store: Store,
    model_id: str,
    path: Path,
    base_model: str,
    source: dict[str, Any],
    tenant: str = "default",
) -> dict[str, Any]:
    """Promote ``path`` (weights, or an adapter over ``base_model``) as ``tenant``'s ``model_id``."""
    store.add_model(model_id, str(path), base_model, source, tenant)
    return store.model(model_id) or {}


def resolve(
    store: Store, model: str, tenant: str | None = None
) -> tuple[str, Callable[[], TrainingEngine]]:
    """(pool key, loader) for a promoted model id that ``tenant`` (None: any) owns, or a
    base model name.

    A hosted service's name for a promoted model, ``accounts/<tenant>/models/<id>``, is
    that model when the tenant owns it; ``accounts/fireworks/models/...`` names a base
    model (the registry maps it).
    """
    m = HOSTED_MODEL_RE.fullmatch(model)
    if m is not None and m.group(1) != HOSTED_BASE_ACCOUNT:
        row = store.model(m.group(2), tenant)
        if row is None or row["tenant"] != m.group(1):
            raise NotFound(f"model {shown(model)} does not exist (GET /v1/models lists them)")
    else:
        row = store.model(model, tenant)
    if row is not None:
        return row["path"], lambda: load_inference_engine(row["path"], row["base_model"] or None)
    try:
        engine_config(model, 0, None)
    except BadRequest:
        raise NotFound(f"model {model!r} does not exist (GET /v1/models lists them)") from None
    return f"base:{model}", lambda: load_inference_engine(model)
