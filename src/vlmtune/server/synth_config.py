"""The CLI's job-create body, back to the hosted trainer's TOML keys.

``synth-ai`` does not send the user's TOML: ``build_sft_payload``
(``synth_ai/api/train/builders.py``) copies some of its keys into ``hyperparameters``
and ``metadata.effective_config`` and drops the rest ([algorithm], [lora], [model]).
``hosted_job`` puts each key back where the TOML had it, so that ``job_dialect``
translates it with the same tables as for ``vlmtune train --config`` (step counts,
``global_batch``, ``training.mode``, the [training.validation] keys the CLI copies into
``hyperparameters``, ``parallelism``). Only what is the body's own is read here:
``training_type``, the uploaded files, and ``metadata.effective_config``'s other keys
(ignored, each with a note).

LoRA settings never reach the server (``lora_*`` are not among the keys the CLI
copies), so a job runs with vlmtune's LoRA defaults; full fine-tuning shows only in
``training.mode``, from which the dialect takes the variety.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from vlmtune.config import ConfigError
from vlmtune.job_dialect import IgnoredKey, translate
from vlmtune.protocol.errors import shown

SOURCE = "learning job"  # what a problem list is about: the create body

# training_type -> the variety it implies (None: the job's own). LearningClient sends
# fft/qft as SFT types too.
TRAINING_TYPES: dict[str, str | None] = {
    "sft_offline": None,
    "sft": None,
    "fft": "fft",
    "qft": "qlora",
}
# Problems name TOML keys; the create body names some of them otherwise.
BODY_NAMES = {
    "job.model": "model (job.model)",
    "job.data": "training_file_id (job.data)",
    "job.validation_data": "validation file (job.validation_data)",
}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _ignored(notes: list[str], key: str, value: Any, reason: str) -> None:
    notes.append(str(IgnoredKey(key, value, reason)))


def _section(value: Any, key: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key}: must be an object, got {type(value).__name__}")
        return {}
    return dict(value)


def hosted_job(body: dict[str, Any], model: str, name: str) -> tuple[dict[str, Any], list[str]]:
    """The create body as the hosted trainer's TOML keys, and notes on what was ignored
    beyond what ``job_dialect`` reports. ``model``: the model served for the body's
    (``--model-alias`` applied). ``ConfigError`` lists every problem."""
    body = copy.deepcopy(body)  # the caller keeps the body as sent
    problems: list[str] = []
    notes: list[str] = []
    kind = str(body.get("training_type") or "sft_offline").strip().lower()
    if kind not in TRAINING_TYPES:
        problems.append(
            f"training_type: {shown(kind)} is not trained here through this API "
            f"({', '.join(TRAINING_TYPES)}); DPO and RL jobs are POST /v1/jobs"
        )
    data = body.get("training_file_id")
    if not isinstance(data, str) or not data:
        problems.append("training_file_id: required (upload the JSONL with POST /api/files)")
    metadata = _section(body.get("metadata"), "metadata", problems)
    effective = _section(metadata.get("effective_config"), "metadata.effective_config", problems)
    compute = _section(effective.pop("compute", None), "compute", problems)
    data_cfg = _section(effective.pop("data", None), "data", problems)
    training = _section(effective.pop("training", None), "training", problems)
    for key, value in effective.items():
        _ignored(
            notes, f"metadata.effective_config.{key}", value, "not a setting this server reads"
        )
    hp = _section(body.get("hyperparameters"), "hyperparameters", problems)
    validation = body.get("validation_file")
    extra_validation = data_cfg.pop("validation_files", None) or []
    if not validation and isinstance(extra_validation, list) and extra_validation:
        validation, *rest = extra_validation
        if rest:
            _ignored(notes, "data.validation_files[1:]", rest, "one validation file is read")
    if problems:
        raise ConfigError(SOURCE, problems)
    # variety None: the dialect takes it from training.mode or train_kind, as for a TOML
    variety = TRAINING_TYPES[kind]
    raw: dict[str, Any] = {
        "algorithm": {"type": "offline", "method": "sft", "variety": variety},
        "job": {"model": model, "data": data, "validation_data": validation, "name": name},
        "compute": compute,
        "data": data_cfg,
        "training": training,
        "hyperparameters": hp,
    }
    return {k: v for k, v in raw.items() if v}, notes


def dialect_notes(raw: dict[str, Any]) -> list[str]:
    """What ``job_dialect`` moves and ignores in ``raw`` (as ``vlmtune plan`` shows it)."""
    out = translate(copy.deepcopy(raw))
    return [str(c) for c in out.changes] + [str(i) for i in out.ignored]


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf and nan are TOML too
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def toml_text(raw: dict[str, Any]) -> str:
    """``raw`` (tables of values; ``None`` left out) as a TOML document."""
    lines: list[str] = []
    for section, table in raw.items():
        lines.append(f"[{_toml_key(section)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def body_problems(e: ConfigError) -> ConfigError:
    """A refused job's problems, named as the create body names them."""

    def renamed(problem: str) -> str:
        key, sep, rest = problem.partition(":")
        return f"{BODY_NAMES[key]}:{rest}" if sep and key in BODY_NAMES else problem

    return ConfigError(SOURCE, [renamed(p) for p in e.problems])
