"""The Fireworks training control plane's resources, made from vlmtune's own objects.

The Fireworks training client (``fireworks-ai[training]``) and its cookbook manage
trainers through a control plane (``/v1/accounts/{account}/...``) and then speak Tinker
to each trainer. Here every one of its resources is a view of something vlmtune has:

- an account is the caller's tenant (``GET /v1/accounts`` lists exactly that one);
- a training shape version is a ``vlmtune shapes`` entry (``planning/shapes.py``) with
  its real sizes, published once per trainer mode it admits, plus a ``FORWARD_ONLY``
  twin (reference trainers);
- an ``rlorTrainerJob`` is a trainer job (``server/jobs.py``), its id chosen by the
  client; its endpoint is ``/training/v1/rlorTrainerJobs/{account}/{job}`` (``app.py``);
- a job's checkpoints are the checkpoints of its runs, listed from the store, so a row
  exists as soon as the save's future resolves and outlives the job;
- a model is a promoted model (``accounts/{tenant}/models/{id}``) or, under the
  ``fireworks`` account, a base model of the registry's name table.

Pure functions of rows and shapes: the routes (``routes/fireworks.py``) do the I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from vlmtune.models.registry import (
    UnknownModelError,
    get_model_spec,
    hosted_name,
    same_model,
)
from vlmtune.planning.shapes import TrainingShape, list_shapes
from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.server.auth import TENANT_RE, Identity
from vlmtune.server.catalog import HOSTED_BASE_ACCOUNT

SHAPE_VERSION = "v1"  # every published shape has one version: this release's sizes
LORA_SUFFIX = "-lora"  # the LoRA twin of a shape that also trains every weight
FORWARD_ONLY_SUFFIX = "-forward-only"  # the reference-trainer twin of every shape
# Fireworks resource ids (jobs, models): what its client validates before sending.
RESOURCE_ID_RE = re.compile(r"^[a-z0-9-]{1,63}$")
DEFAULT_CONTEXT = 4096  # a job with no shape and no maxContextLength: the engine's row size
ACCELERATORS = {
    "H100": "NVIDIA_H100_80GB",
    "H200": "NVIDIA_H200_141GB",
    "B200": "NVIDIA_B200_180GB",
    "A100-80GB": "NVIDIA_A100_80GB",
    "A100-40GB": "NVIDIA_A100_40GB",
    "L40S": "NVIDIA_L40S",
    "L4": "NVIDIA_L4",
    "A10G": "NVIDIA_A10G",
    "cpu": "CPU",
}
# A vlmtune job state as the client's JOB_STATE_* (it waits on RUNNING, gives up on the rest).
JOB_STATES = {
    "running": "JOB_STATE_RUNNING",
    "cancelled": "JOB_STATE_CANCELLED",
    "deleted": "JOB_STATE_DELETED",
    "failed": "JOB_STATE_FAILED",
    "succeeded": "JOB_STATE_COMPLETED",
}
T = TypeVar("T")


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with microseconds and Z: the cookbook compares these as strings."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def page(items: Sequence[T], size: int, token: str) -> tuple[list[T], str]:
    """One page of ``items`` and the token of the next ("" after the last)."""
    if token and not token.isdigit():
        raise BadRequest(f"pageToken {shown(token)}: pass the nextPageToken of the last page")
    start = int(token or 0)
    end = start + size
    return list(items[start:end]), str(end) if end < len(items) else ""


# ---- accounts ---------------------------------------------------------------------------
def account_scope(identity: Identity, account: str) -> str | None:
    """The tenant whose objects ``accounts/{account}/...`` reaches for this caller: its own
    account, or any tenant's for an operator; None: an account the caller cannot see
    (answered as unknown, exactly as one that does not exist)."""
    if account == identity.tenant or (identity.operator and TENANT_RE.match(account)):
        return account
    return None


def account_resource(tenant: str) -> dict[str, Any]:
    return {"name": f"accounts/{tenant}", "displayName": tenant, "state": "READY"}


# ---- training shapes --------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedShape:
    """A shape as the control plane lists it: one trainer mode of a vlmtune shape."""

    name: str  # the shape id in accounts/fireworks/trainingShapes/<name>
    shape: TrainingShape
    trainer_mode: str  # POLICY_TRAINER | LORA_TRAINER | FORWARD_ONLY

    @property
    def mode(self) -> str | None:
        """The vlmtune fine-tuning mode a trainer on it runs (None: forward passes only)."""
        if self.trainer_mode == "POLICY_TRAINER":
            return "full"
        if self.trainer_mode == "LORA_TRAINER":
            return "lora" if "lora" in self.shape.modes else "qlora"
        return None

    @property
    def version_name(self) -> str:
        return f"accounts/{HOSTED_BASE_ACCOUNT}/trainingShapes/{self.name}/versions/{SHAPE_VERSION}"


def published_shapes() -> list[PublishedShape]:
    """Every vlmtune shape under its own name (full fine-tuning if it admits it, else
    LoRA), a ``-lora`` twin when it admits both, and a ``-forward-only`` twin: a hosted
    shape has one trainer mode, and the cookbook picks shapes by mode."""
    out = []
    for s in list_shapes():
        main = "POLICY_TRAINER" if "full" in s.modes else "LORA_TRAINER"
        out.append(PublishedShape(s.name, s, main))
        if main == "POLICY_TRAINER" and {"lora", "qlora"} & set(s.modes):
            out.append(PublishedShape(s.name + LORA_SUFFIX, s, "LORA_TRAINER"))
        out.append(PublishedShape(s.name + FORWARD_ONLY_SUFFIX, s, "FORWARD_ONLY"))
    return out


def shape_version(p: PublishedShape) -> dict[str, Any]:
    """The version resource the client turns into a training profile (real sizes)."""
    s = p.shape.for_mode(p.mode) if p.mode else p.shape
    spec = get_model_spec(s.model)
    snapshot = {
        "baseModel": hosted_name(s.model) or s.model,
        "modelType": "qwen3_vl_moe" if spec.is_moe else "qwen3_vl",
        "parameterCount": str(spec.params),  # int64: a string in JSON, as protobuf writes it
        "trainerMode": p.trainer_mode,
        "trainerImageTag": "vlmtune",
        "maxSupportedContextLength": s.max_context,
        "nodeCount": s.nodes,
        "acceleratorType": ACCELERATORS.get(s.gpu_type, s.gpu_type.upper()),
        "acceleratorCount": s.gpu_count,
        "baseModelWeightPrecision": s.precision.upper(),
        "trainerShardingScheme": {"pipelineParallelism": 1},
        # RL's managed deployments need one (a sampler of the trainer's weights).
        "deploymentShapeVersion": (
            f"accounts/{HOSTED_BASE_ACCOUNT}/deploymentShapes/{s.name}/versions/{SHAPE_VERSION}"
        ),
        "deploymentImageTag": "vlmtune",
        "vlmtune": {
            "shape": s.name,
            "modes": list(s.modes),
            "sharding": s.sharding,
            "activationCheckpointing": s.activation_checkpointing,
            "cpuOffload": s.cpu_offload,
        },  # fmt: skip
    }
    return {
        "name": p.version_name,
        "state": "STATE_READY",
        "latestValidated": True,
        "validated": True,
        "public": True,
        "snapshot": snapshot,
    }


_SHAPE_REF = re.compile(r"accounts/[^/]+/trainingShapes/([^/]+)(?:/versions/([^/]+))?")


def find_shape(shape_id: str, version: str | None = None) -> PublishedShape:
    """The published shape ``shape_id`` (at ``version``, if given), or NotFound."""
    p = next((p for p in published_shapes() if p.name == shape_id), None)
    if p is None or version not in (None, SHAPE_VERSION):
        known = ", ".join(x.name for x in published_shapes())
        what = f"{shape_id}/versions/{version}" if version else shape_id
        raise NotFound(
            f"unknown training shape {shown(what)}: this server publishes version "
            f"{SHAPE_VERSION} of {known} (vlmtune shapes)"
        )
    return p


def shape_from_ref(ref: str) -> PublishedShape:
    """``accounts/<a>/trainingShapes/<s>[/versions/<v>]`` (the create query's form)."""
    m = _SHAPE_REF.fullmatch(ref)
    if m is None:
        raise BadRequest(
            f"trainingShape {shown(ref)}: expected accounts/<account>/trainingShapes/<shape>"
            "[/versions/<version>]"
        )
    return find_shape(m.group(1), m.group(2))


def auto_shape(base_model: str, lora_rank: int, forward_only: bool) -> PublishedShape | None:
    """The first published shape for ``base_model`` in the mode the job needs (the
    table lists the shortest context first), or None."""
    mode = "FORWARD_ONLY" if forward_only else "LORA_TRAINER" if lora_rank else "POLICY_TRAINER"
    for p in published_shapes():
        if p.trainer_mode == mode and same_model(p.shape.model, base_model):
            return p
    return None


def check_shape_mode(p: PublishedShape, lora_rank: int, forward_only: bool) -> None:
    """A trainer on ``p`` must train the way the shape was planned for."""
    if forward_only:
        return  # a reference trainer only runs forward passes: any shape holds it
    if p.trainer_mode == "FORWARD_ONLY":
        raise BadRequest(f"training shape {p.name!r} is for forward-only (reference) trainers: "
                         "set forwardOnly, or pick a training shape")  # fmt: skip
    needed = {"lora", "qlora"} if lora_rank else {"full"}
    # The shape's own name admits every mode vlmtune planned it for; its -lora twin LoRA.
    planned = set(p.shape.modes) - ({"full"} if p.trainer_mode == "LORA_TRAINER" else set())
    if not needed & planned:
        how = f"LoRA (loraRank {lora_rank})" if lora_rank else "every weight (loraRank 0)"
        raise BadRequest(
            f"training shape {p.name!r} is planned for {'/'.join(sorted(planned))} only, "
            f"and this job trains {how}: pick another shape (vlmtune shapes) or change "
            "loraRank"
        )


def shape_profile(p: PublishedShape) -> dict[str, Any]:
    """What a trainer job records of its shape (``GET /v1/jobs/<id>`` shows it)."""
    s = p.shape
    return {"shape_id": p.name, "training_shape": p.version_name, "trainer_mode": p.trainer_mode,
            "description": s.description, "devices": s.world_size, "gpu_type": s.gpu_type,
            "max_sequence_length": s.max_context, "precision": s.precision,
            "modes": list(s.modes)}  # fmt: skip


# ---- the list filter (the old cookbook's shape auto-select) -------------------------------
_CLAUSE = re.compile(r'\s*([A-Za-z_.]+)\s*(>=|<=|!=|=|>|<)\s*("[^"]*"|[^\s"]+)\s*')
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
}  # fmt: skip
# filter field -> (how to read it from a version, how to read the clause's value)
_FIELDS: dict[str, tuple[Callable[[dict], Any], Callable[[str], Any]]] = {
    "snapshot.base_model": (lambda v: v["snapshot"]["baseModel"], str),
    "snapshot.trainer_mode": (lambda v: v["snapshot"]["trainerMode"], str),
    "snapshot.model_type": (lambda v: v["snapshot"]["modelType"], str),
    "snapshot.parameter_count": (lambda v: int(v["snapshot"]["parameterCount"]), int),
    "latest_validated": (lambda v: v["latestValidated"], lambda x: x.lower() == "true"),
    "validated": (lambda v: v["validated"], lambda x: x.lower() == "true"),
    "public": (lambda v: v["public"], lambda x: x.lower() == "true"),
}


def version_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """``a="x" AND b>=3 AND ...`` (AIP-160's subset the clients send) as a predicate."""
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for clause in re.split(r"\s+AND\s+", text.strip()) if text.strip() else []:
        m = _CLAUSE.fullmatch(clause)
        if m is None or m.group(1) not in _FIELDS:
            raise BadRequest(
                f"filter clause {shown(clause)}: expected <field> <op> <value> with a field of "
                f"{', '.join(_FIELDS)}, clauses joined by AND"
            )
        read, parse = _FIELDS[m.group(1)]
        try:
            want = parse(m.group(3).strip('"'))
        except ValueError:
            raise BadRequest(f"filter clause {shown(clause)}: not a number") from None
        tests.append(_clause_test(read, _OPS[m.group(2)], want))
    return lambda v: all(t(v) for t in tests)


def _clause_test(
    read: Callable[[dict], Any], op: Callable[[Any, Any], bool], want: Any
) -> Callable[[dict[str, Any]], bool]:
    return lambda version: op(read(version), want)


# ---- trainer jobs -----------------------------------------------------------------------
def job_resource(row: dict[str, Any]) -> dict[str, Any]:
    """A trainer job as an ``rlorTrainerJob`` (the client reads name, state, status and
    trainingConfig.maxContextLength)."""
    cfg = row["config"]
    profile = cfg.get("profile") or {}
    state = JOB_STATES.get(row["state"], "JOB_STATE_UNSPECIFIED")
    status = {"code": "OK", "message": ""}
    if row["state"] == "failed":
        status = {"code": "INTERNAL", "message": row.get("error") or "the trainer failed"}
    return {
        "name": f"accounts/{row['tenant']}/rlorTrainerJobs/{row['id']}",
        "displayName": row["name"],
        "state": state,
        "status": status,
        "createTime": rfc3339(row["created"]),
        "updateTime": rfc3339(row["updated"]),
        "serviceMode": True,
        "forwardOnly": bool(cfg.get("forward_only")),
        "trainingShape": profile.get("training_shape") or "",
        "trainingConfig": {
            "baseModel": cfg.get("requested_base_model") or cfg["base_model"],
            "loraRank": cfg["lora_rank"],
            "learningRate": cfg["learning_rate"],
            "maxContextLength": profile.get("max_sequence_length") or DEFAULT_CONTEXT,
        },
        "vlmtune": {"job_id": row["id"], "base_model": cfg["base_model"]},
    }


def checkpoint_resource(job: dict[str, Any], ckpt: dict[str, Any], lora: bool) -> dict[str, Any]:
    """A checkpoint row of a job's run: sampler saves are promotable, training state
    (``save_weights``) is resumable."""
    if ckpt["kind"] == "training":
        ctype = "CHECKPOINT_TYPE_TRAINING_LORA" if lora else "CHECKPOINT_TYPE_TRAINING"
    else:  # a LoRA run's merged save holds full weights
        adapter = lora and ckpt["checkpoint_type"] != "merged"
        ctype = "CHECKPOINT_TYPE_INFERENCE_LORA" if adapter else "CHECKPOINT_TYPE_INFERENCE_BASE"
    created = rfc3339(ckpt["created"])
    return {
        "name": f"accounts/{job['tenant']}/rlorTrainerJobs/{job['id']}/checkpoints/{ckpt['name']}",
        "createTime": created,
        "updateTime": created,
        "checkpointType": ctype,
        "promotable": ckpt["kind"] == "sampler",
        "vlmtune": {"run_id": ckpt["run_id"], "kind": ckpt["kind"], "step": ckpt["step"]},
    }


# ---- models -----------------------------------------------------------------------------
def model_resource(row: dict[str, Any]) -> dict[str, Any]:
    """A promoted model: full weights (``HF_BASE_MODEL``) or a LoRA adapter over its base
    (``HF_PEFT_ADDON``, with ``peftDetails``)."""
    out: dict[str, Any] = {
        "name": f"accounts/{row['tenant']}/models/{row['id']}",
        "displayName": row["id"],
        "state": "READY",
        "kind": "HF_BASE_MODEL",
        "createTime": rfc3339(row["created"]),
        "baseModelDetails": {"checkpointFormat": "HF"},
        "vlmtune": {"id": row["id"], "base_model": row["base_model"], "source": row["source"]},
    }
    adapter = Path(row["path"]) / "adapter_config.json"
    if adapter.is_file():
        cfg = json.loads(adapter.read_text())
        out["kind"] = "HF_PEFT_ADDON"
        out["peftDetails"] = {
            "baseModel": hosted_name(row["base_model"]) or row["base_model"],
            "r": cfg.get("r"),
            "targetModules": cfg.get("target_modules"),
        }
    return out


def base_model_resource(name: str, served: str) -> dict[str, Any] | None:
    """A base model named ``accounts/fireworks/models/<id>`` that ``served`` (its
    ``--model-alias`` target, or itself) resolves to; None if the registry knows
    neither. Sizes are the name's own when the registry knows it (as the shapes')."""
    spec = None
    for candidate in (name, served):
        try:
            spec = get_model_spec(candidate)
            break
        except UnknownModelError:
            continue
    if spec is None:
        return None
    return {
        "name": name,
        "displayName": name.rsplit("/", 1)[-1],
        "state": "READY",
        "kind": "HF_BASE_MODEL",
        "supportsImageInput": spec.supports_vision,
        "baseModelDetails": {
            "checkpointFormat": "HF",
            "modelType": "qwen3_vl_moe" if spec.is_moe else "qwen3_vl",
            "parameterCount": str(spec.params),
            "moe": spec.is_moe,
            "worldSize": 1,
        },
        "vlmtune": {"served_as": served, "hf_id": spec.name},
    }
