"""Deployments: named sampling endpoints that hot-load a trainer job's sampler checkpoints.

The Fireworks training SDK's RL loops (and the cookbook's ``rl_loop``) create one
(``POST /v1/accounts/{a}/deployments``), attach it to their trainer job
(``hotLoadTrainerJob``), hot-load each sampler checkpoint the trainer saves
(``/hot_load/v1/models/hot_load``) and sample from it (``/inference/v1/completions``).

Here a deployment is a store row owned by a tenant (its account): its settings as sent
(camelCase, echoed back), the snapshot it has loaded, and a generation that names its
"pod" (``replicas[].identity``). A reattach (a new ``hotLoadTrainerJob``) is a new pod
with nothing loaded, as on the hosted service: the 1.2.9 client waits for that
identity to change. The loaded checkpoint is served exactly as a Tinker sampling
session over the same path (``SamplerManager.pool_engine``: one ``ModelPool`` engine);
before any hot-load the deployment serves its base model. A hot-load is synchronous:
the engine is loaded before the POST answers, so the first status poll matches.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Annotated, Any

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.protocol.paths import is_tinker_path, parse_tinker_path
from vlmtune.protocol.wire import WireModel
from vlmtune.server.fireworks import rfc3339
from vlmtune.server.run_config import engine_config
from vlmtune.server.samplers import Sampler, SamplerManager
from vlmtune.server.store import Store

log = logging.getLogger("vlmtune.server")

DEPLOYMENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# ``accounts/{a}/deployments/{id}``: the inference ``model`` and the hot-load header.
_DEPLOYMENT_NAME = re.compile(r"^accounts/([^/]{1,64})/deployments/([^/]{1,63})$")
_TRAINER_JOB = re.compile(r"^(?:accounts/[^/]{1,64}/rlorTrainerJobs/)?([A-Za-z0-9._-]{1,128})$")
MAX_REPLICAS = 64
# PATCH ``updateMask`` paths (snake_case, as the SDK sends them) a client may change; a
# change of the first two rolls the pod (a new replica identity, nothing loaded).
MUTABLE = {
    "hot_load_trainer_job": "hotLoadTrainerJob",
    "hot_load_transition_type": "hotLoadTransitionType",
    "min_replica_count": "minReplicaCount",
    "max_replica_count": "maxReplicaCount",
    "description": "description",
    "display_name": "displayName",
    "annotations": "annotations",
}
_ROLLS_POD = ("hotLoadTrainerJob", "hotLoadTransitionType")
Text = Annotated[str, Field(max_length=1000)]


class Placement(WireModel):
    region: str | None = Field(None, max_length=64)


class DeploymentPatch(WireModel):
    """A deployment's settings as the SDK sends them (camelCase); every one optional."""

    model_config = ConfigDict(
        extra="ignore", protected_namespaces=(), alias_generator=to_camel, populate_by_name=True
    )

    base_model: str | None = Field(
        None, min_length=1, max_length=4096, description="the model served before any hot-load"
    )
    display_name: str | None = Field(None, max_length=200, description="a label, echoed")
    description: str | None = Field(None, max_length=1000, description="free text, echoed")
    min_replica_count: int | None = Field(
        None, ge=0, le=MAX_REPLICAS, description="0 with max 0: scaled to zero (unloaded)"
    )
    max_replica_count: int | None = Field(
        None, ge=0, le=MAX_REPLICAS, description="this server runs one replica whenever > 0"
    )
    enable_hot_load: bool | None = Field(None, description="echoed; hot-load always works")
    for_training: bool | None = Field(None, description="echoed")
    hot_load_bucket_type: str | None = Field(None, max_length=64, description="echoed")
    hot_load_trainer_job: str | None = Field(
        None,
        max_length=300,
        description="accounts/{a}/rlorTrainerJobs/{job}: whose sampler checkpoints a bare "
        "hot-load identity names",
    )
    hot_load_transition_type: str | None = Field(None, max_length=64, description="echoed")
    deployment_shape: str | None = Field(None, max_length=300, description="echoed")
    accelerator_type: str | None = Field(None, max_length=64, description="echoed")
    accelerator_count: int | None = Field(None, ge=0, le=MAX_REPLICAS, description="echoed")
    extra_args: list[Text] | None = Field(None, max_length=64, description="ignored")
    extra_values: dict[str, Text] | None = Field(None, max_length=64, description="ignored")
    annotations: dict[str, Text] | None = Field(None, max_length=64, description="echoed")
    placement: Placement | None = Field(None, description="ignored (one machine)")
    preemptible: bool | None = Field(None, description="ignored")


class DeploymentSpec(DeploymentPatch):
    """``POST .../deployments``: a new deployment (only ``baseModel`` is required)."""

    base_model: str = Field(
        min_length=1, max_length=4096, description="the model served before any hot-load"
    )
    min_replica_count: int = Field(0, ge=0, le=MAX_REPLICAS, description="echoed")
    max_replica_count: int = Field(
        1, ge=0, le=MAX_REPLICAS, description="0: scaled to zero (this server runs one)"
    )


def parse_deployment_name(name: str, where: str) -> tuple[str, str]:
    """(account, deployment id) of ``accounts/{a}/deployments/{id}``, or a 400."""
    m = _DEPLOYMENT_NAME.match(name)
    if m is None:
        raise BadRequest(
            f"{where}: {shown(name)} is not a deployment: accounts/<a>/deployments/<id>"
        )
    return m.group(1), m.group(2)


def check_deployment_id(deployment_id: str) -> None:
    if not DEPLOYMENT_ID_RE.match(deployment_id):
        raise BadRequest(
            f"deploymentId {shown(deployment_id)}: use 1-63 characters of a-z, 0-9 and - "
            "(starting with a letter or digit)"
        )


def trainer_job_id(ref: str) -> str:
    m = _TRAINER_JOB.match(ref)
    if m is None:
        raise BadRequest(
            f"hotLoadTrainerJob {shown(ref)}: expected accounts/<a>/rlorTrainerJobs/<id>"
        )
    return m.group(1)


def resource(row: dict[str, Any]) -> dict[str, Any]:
    """The deployment as the SDK reads it: its settings as sent, plus name, state, times."""
    return {
        "name": f"accounts/{row['tenant']}/deployments/{row['id']}",
        **row["config"],
        "state": "READY",  # loading is synchronous: a deployment is ready once it exists
        "createTime": rfc3339(row["created"]),
        "updateTime": rfc3339(row["updated"]),
    }


def replica_status(row: dict[str, Any]) -> dict[str, Any]:
    """``GET hot_load``: one replica (scaled to zero, it comes back on the next request)."""
    error = row["load_error"] is not None
    return {
        "replicas": [
            {
                "identity": f"{row['id']}-pod{row['generation']}",
                "current_snapshot_identity": row["loaded_identity"],
                "readiness": True,
                "loading_state": {
                    "stage": "error" if error else "done",
                    "target_snapshot_identity": row["load_target"]
                    if error
                    else row["loaded_identity"],
                    **({"error": row["load_error"]} if error else {}),
                },
            }
        ]
    }


class Deployments:
    """The deployments of the store, served through the samplers' engine pool."""

    def __init__(self, store: Store, samplers: SamplerManager) -> None:
        self.store = store
        self.samplers = samplers

    def get(self, tenant: str, deployment_id: str) -> dict[str, Any]:
        row = self.store.deployment(tenant, deployment_id)
        if row is None:
            raise NotFound(f"deployment {shown(deployment_id)} not found")
        return row

    def create(
        self, tenant: str, deployment_id: str, spec: DeploymentSpec, served: str
    ) -> dict[str, Any] | None:
        """The new deployment serving ``served`` (``baseModel`` after ``--model-alias``),
        or None if ``tenant`` has one of that id (a 409)."""
        check_deployment_id(deployment_id)
        self._check(spec)
        engine_config(served, 0, None)  # servable here, or a 400 naming it
        config = spec.model_dump(by_alias=True, exclude_none=True)  # echoed as sent
        if not self.store.add_deployment(tenant, deployment_id, served, config):
            return None
        return self.get(tenant, deployment_id)

    def patch(
        self, tenant: str, deployment_id: str, patch: DeploymentPatch, mask: str | None
    ) -> dict[str, Any]:
        """Apply the fields ``mask`` names (snake or camel case), or without a mask every
        field the body sets; a new trainer job rolls the pod."""
        row = self.get(tenant, deployment_id)
        sent = patch.model_dump(by_alias=True, exclude_unset=True)
        if mask:
            fields = [_mask_field(p.strip()) for p in mask.split(",") if p.strip()]
            changes = {f: sent.get(f) for f in fields}  # a masked field left out is cleared
        else:
            fixed = sorted(
                k for k in sent if k not in MUTABLE.values() and sent[k] != row["config"].get(k)
            )
            if fixed:
                raise BadRequest(
                    f"{', '.join(fixed)} cannot be changed on a deployment (changeable: "
                    f"{', '.join(MUTABLE.values())}); delete it and create it again"
                )
            changes = {k: v for k, v in sent.items() if k in MUTABLE.values()}
        config = {k: v for k, v in {**row["config"], **changes}.items() if v is not None}
        self._check(DeploymentPatch.model_validate(config))
        values: dict[str, Any] = {"config": config, "updated": time.time()}
        if any(config.get(k) != row["config"].get(k) for k in _ROLLS_POD):
            values.update(generation=row["generation"] + 1, **_UNLOADED)
            self._release(row)
        elif config.get("maxReplicaCount") == 0:
            self._release(row, base_too=True)  # scaled to zero: its memory goes back
        self.store.update_deployment(tenant, deployment_id, **values)
        return self.get(tenant, deployment_id)

    def delete(self, tenant: str, deployment_id: str) -> None:
        row = self.get(tenant, deployment_id)
        self.store.delete_deployment(tenant, deployment_id)
        self._release(row)

    def serving(self, row: dict[str, Any]) -> Sampler:
        """What the deployment samples: its hot-loaded checkpoint, else its base model."""
        sid = f"deployment:{row['tenant']}/{row['id']}"
        if row["loaded_path"]:
            base = self.samplers.runs.base_model(row["loaded_run"])
            return Sampler(sid, "path", base, row["loaded_run"], row["loaded_path"], row["tenant"])
        return Sampler(sid, "base", row["base_model"], tenant=row["tenant"])

    async def hot_load(self, row: dict[str, Any], identity: str) -> dict[str, Any]:
        """Load the sampler checkpoint ``identity`` names (a ``tinker://`` path, or a bare
        name among the attached trainer job's), then answer: a status poll then matches."""
        checkpoint = self._resolve(row, identity)
        tenant, deployment_id = row["tenant"], row["id"]
        sampler = Sampler("", "path", self.samplers.runs.base_model(checkpoint["run_id"]),
                          checkpoint["run_id"], checkpoint["path"], tenant)  # fmt: skip
        key, loader = self.samplers.pool_engine(sampler)
        try:  # loaded now (a no-op if it is), so the first completion waits for nothing
            await asyncio.wrap_future(self.samplers.pool.run(key, loader, lambda e: None))
        except Exception as e:
            # Retrying cannot help (the client retries a 5xx for minutes): a 400 says why.
            log.exception("hot-load of %s onto %s failed", identity, deployment_id)
            error = f"{type(e).__name__}: {e}"
            self.store.update_deployment(
                tenant, deployment_id, load_target=identity, load_error=error
            )
            raise BadRequest(f"hot-load of {shown(identity)} failed: {error}") from None
        if checkpoint["path"] != row["loaded_path"]:
            self._release(row)  # the previous snapshot's engine
        self.store.update_deployment(
            tenant, deployment_id, loaded_identity=identity, loaded_run=checkpoint["run_id"],
            loaded_path=checkpoint["path"], load_target=identity, load_error=None,
            updated=time.time(),
        )  # fmt: skip
        return self.get(tenant, deployment_id)

    # ---- helpers ------------------------------------------------------------------------
    def _check(self, spec: DeploymentPatch) -> None:
        lo, hi = spec.min_replica_count, spec.max_replica_count
        if lo is not None and hi is not None and lo > hi:
            raise BadRequest(f"minReplicaCount ({lo}) exceeds maxReplicaCount ({hi})")
        if spec.hot_load_trainer_job is not None:
            trainer_job_id(spec.hot_load_trainer_job)

    def _resolve(self, row: dict[str, Any], identity: str) -> dict[str, Any]:
        """The sampler checkpoint row ``identity`` names, owned by the deployment's tenant."""
        runs = self.samplers.runs
        if is_tinker_path(identity):
            _, kind, _ = parse_tinker_path(identity)
            if kind != "sampler":
                raise BadRequest(
                    f"identity {shown(identity)} is a training state: hot-load a sampler "
                    "checkpoint (tinker://<run>/sampler_weights/<name>)"
                )
            return runs.resolve_checkpoint(identity, None, "sampler", row["tenant"])
        job_ref = row["config"].get("hotLoadTrainerJob")
        if job_ref is None:
            raise BadRequest(
                f"identity {shown(identity)} is a bare name, and deployment {row['id']!r} has no "
                "hotLoadTrainerJob to look it up in: send its tinker:// path"
            )
        job_id = trainer_job_id(job_ref)
        if self.store.job(job_id, row["tenant"]) is None:
            raise NotFound(
                f"trainer job {shown(job_id)} (the deployment's hotLoadTrainerJob) not found"
            )
        rows = self.store.job_checkpoints(job_id, "sampler", identity)
        if not rows:
            raise NotFound(f"trainer job {job_id!r} has no sampler checkpoint {shown(identity)}")
        return max(rows, key=lambda r: r["created"])  # a name saved by several runs: the newest

    def _release(self, row: dict[str, Any], base_too: bool = False) -> None:
        """Let go of the engine serving ``row`` (the next request loads it again)."""
        if row["loaded_path"] or base_too:
            self.samplers.pool.drop(self.samplers.pool_engine(self.serving(row))[0])


_UNLOADED = {"loaded_identity": None, "loaded_run": None, "loaded_path": None,
             "load_target": None, "load_error": None}  # fmt: skip


def _mask_field(path: str) -> str:
    field = MUTABLE.get(path) or (path if path in MUTABLE.values() else None)
    if field is None:
        raise BadRequest(
            f"updateMask: {shown(path)} cannot be changed (changeable: {', '.join(MUTABLE)})"
        )
    return field
