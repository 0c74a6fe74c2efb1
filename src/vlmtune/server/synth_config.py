"""The CLI's job-create body, back to the hosted trainer's TOML keys.

``synth-ai`` does not send the user's TOML: ``build_sft_payload``
(``synth_ai/api/train/builders.py``) copies some of its keys into ``hyperparameters``
and ``metadata.effective_config`` and drops the rest ([algorithm], [lora], [model]).
``hosted_job`` puts each key back where the TOML had it, so that ``job_dialect``
translates it exactly as for ``vlmtune train --config``. What the digest adds or spells
in a way the dialect does not know is used or ignored here, each with a note (the same
``key: old -> new (reason)`` and ``key = value is ignored (reason)`` lines).

LoRA settings never reach the server (``lora_*`` are not among the keys the CLI
copies), so a job runs with vlmtune's LoRA defaults; full fine-tuning shows only in
``training.mode``.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from vlmtune.config import ConfigError
from vlmtune.job_dialect import (
    IGNORED_KEYS,
    MOVED_KEYS,
    REPLICATE_REASON,
    IgnoredKey,
    translate,
)
from vlmtune.protocol.errors import shown
from vlmtune.settings import SettingChange

SOURCE = "learning job"  # what a problem list is about: the create body

# training_type -> the variety it implies (None: the job's own). LearningClient sends
# fft/qft as SFT types too.
TRAINING_TYPES: dict[str, str | None] = {
    "sft_offline": None,
    "sft": None,
    "fft": "fft",
    "qft": "qlora",
}
MODES = {"full_finetune": "full", "fft": "full"}  # hosted training.mode -> vlmtune's
VARIETY_OF_MODE = {"full": "fft", "qlora": "qlora"}  # modes the default variety contradicts
STEP_KEYS = ("total_steps", "train_steps", "steps")  # all mean hyperparameters.max_steps
BEST_MODEL_REASON = IGNORED_KEYS["hyperparameters.parallelism.save_best_model_at_end"]
# Keys the CLI adds to ``hyperparameters`` (from [training.validation]) that the
# dialect knows only under [hyperparameters.parallelism].
IGNORED_HYPERPARAMETERS = {
    "save_best_model_at_end": BEST_MODEL_REASON,
    "load_best_model_at_end": BEST_MODEL_REASON,
    "metric_for_best_model": IGNORED_KEYS["hyperparameters.parallelism.metric_for_best_model"],
    "greater_is_better": IGNORED_KEYS["hyperparameters.parallelism.metric_for_best_model"],
}
PARALLELISM_REASON = (
    "a hosted parallelism setting; vlmtune's are compute.sharding and training.precision"
)
VALIDATION_REASON = (
    "evaluation runs when a validation file is uploaded (every hyperparameters.eval_every "
    "steps, 0: at the end)"
)
# hosted keys the dialect translates: passed through for it to report.
DIALECT_KEYS = {*MOVED_KEYS, *IGNORED_KEYS, "hyperparameters.parallelism.deepspeed_stage"}
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


def _count(value: Any) -> int:
    """A process count as given, or 1 for anything else (the schema reports it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _hyperparameters(
    given: dict[str, Any], processes: int, notes: list[str], problems: list[str]
) -> dict[str, Any]:
    hp = dict(given)
    for key in STEP_KEYS:
        if key in hp:
            value = hp.pop(key)
            if "max_steps" not in hp:
                hp["max_steps"] = value
                notes.append(str(SettingChange("hyperparameters.max_steps", None, value, key)))
    for key, reason in IGNORED_HYPERPARAMETERS.items():
        if key in hp:
            _ignored(notes, f"hyperparameters.{key}", hp.pop(key), reason)
    if "global_batch" in hp:
        total = hp.pop("global_batch")
        per_device = hp.get("per_device_batch", hp.get("batch_size", 1))
        if "gradient_accumulation_steps" in hp:
            reason = "per_device_batch x gradient_accumulation_steps x processes sets the batch"
            _ignored(notes, "hyperparameters.global_batch", total, reason)
        elif isinstance(total, int) and isinstance(per_device, int) and total > 0 < per_device:
            steps = max(1, total // (per_device * processes))
            hp["gradient_accumulation_steps"] = steps
            why = f"global_batch {total} / (per_device_batch {per_device} x {processes} processes)"
            notes.append(
                str(SettingChange("hyperparameters.gradient_accumulation_steps", None, steps, why))
            )
        else:
            problems.append(f"hyperparameters.global_batch: must be a positive integer ({total!r})")
    parallelism = hp.get("parallelism")
    if isinstance(parallelism, dict):
        for key in list(parallelism):
            if f"hyperparameters.parallelism.{key}" not in DIALECT_KEYS:
                _ignored(
                    notes, f"hyperparameters.parallelism.{key}", parallelism.pop(key),
                    PARALLELISM_REASON,
                )  # fmt: skip
        if not parallelism:
            hp.pop("parallelism")
    return hp


def _training(given: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    training = dict(given)
    if "validation" in training:
        _ignored(notes, "training.validation", training.pop("validation"), VALIDATION_REASON)
    mode = training.get("mode")
    if isinstance(mode, str) and mode.lower() in MODES:
        training["mode"] = MODES[mode.lower()]
        notes.append(str(SettingChange("training.mode", mode, training["mode"], "the same mode")))
    return training


def _variety_of_mode(training: dict[str, Any], notes: list[str]) -> str | None:
    """The CLI leaves [algorithm] out: full fine-tuning shows only in training.mode."""
    variety = VARIETY_OF_MODE.get(str(training.get("mode")))
    if variety is not None:
        why = f"training.mode {training['mode']!r} ([algorithm] is not sent by the CLI)"
        notes.append(str(SettingChange("algorithm.variety", None, variety, why)))
    return variety


def _unsharded(hp: dict[str, Any], notes: list[str]) -> None:
    """QLoRA trains data-parallel: a ZeRO stage would shard what 4-bit weights cannot."""
    parallelism = hp.get("parallelism")
    if isinstance(parallelism, dict) and "deepspeed_stage" in parallelism:
        key = "hyperparameters.parallelism.deepspeed_stage"
        _ignored(notes, key, parallelism.pop("deepspeed_stage"), REPLICATE_REASON)


def hosted_job(body: dict[str, Any], model: str, name: str) -> tuple[dict[str, Any], list[str]]:
    """The create body as the hosted trainer's TOML keys, and notes on what was used or
    ignored beyond what ``job_dialect`` reports. ``model``: the model served for the
    body's (``--model-alias`` applied). ``ConfigError`` lists every problem."""
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
    training = _training(_section(effective.pop("training", None), "training", problems), notes)
    for key, value in effective.items():
        _ignored(
            notes, f"metadata.effective_config.{key}", value, "not a setting this server reads"
        )
    processes = _count(compute.get("gpu_count")) * _count(compute.get("nodes"))
    hp = _hyperparameters(
        _section(body.get("hyperparameters"), "hyperparameters", problems),
        processes, notes, problems,
    )  # fmt: skip
    validation = body.get("validation_file")
    extra_validation = data_cfg.pop("validation_files", None) or []
    if not validation and isinstance(extra_validation, list) and extra_validation:
        validation, *rest = extra_validation
        if rest:
            _ignored(notes, "data.validation_files[1:]", rest, "one validation file is read")
    if problems:
        raise ConfigError(SOURCE, problems)
    variety = TRAINING_TYPES[kind] or _variety_of_mode(training, notes)
    if variety == "qlora" or training.get("use_qlora") is True:
        _unsharded(hp, notes)
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
