"""The hosted Qwen3-VL trainer's job files, read as vlmtune's own schema.

Users of the hosted trainer (``synth-ai train --type sft --config FILE``) paste its job
files unchanged. Each of its keys that vlmtune's schema spells differently is *used*
(moved to vlmtune's key and reported old -> new, as the vision defaults are), *ignored*
with the reason (it steers machinery vlmtune does not have), or *refused* when its value
would change training in a way vlmtune cannot honour. A key means here what the hosted
CLI makes it mean (``synth_ai/api/train/builders.py`` ``build_sft_payload``). This runs
on the raw TOML before validation, so a moved value is validated exactly like one the
user wrote, and the error names the key the user wrote.

``server/synth_config.py`` puts the hosted CLI's job-create body back into these keys,
so a TOML file and the CLI's body are translated by the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.hosted_keys import (
    FOREIGN_TARGETS,
    HOSTED_TABLES,
    IGNORED_KEYS,
    METHOD_MODES,
    METHODS,
    MODES,
    MOVED_KEYS,
    QLORA_REASON,
    REPLICATE_REASON,
    TRAIN_KINDS,
    VARIETY_OF_MODE,
    ZERO_STAGE_SHARDING,
)
from vlmtune.settings import SettingChange


@dataclass(frozen=True)
class IgnoredKey:
    key: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r} is ignored ({self.reason})"


@dataclass
class Translation:
    changes: list[SettingChange] = field(default_factory=list)
    ignored: list[IgnoredKey] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def get_dotted(raw: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(whether ``a.b.c`` is set in a raw TOML dict, its value)."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _pop(raw: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    if parents and node == {}:  # an emptied [hyperparameters.parallelism] goes too
        _pop(raw, ".".join(parents))


class _Rewrite:
    """One job's rewrite: every step reports what it used, ignored or refused."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.out = Translation()

    def get(self, dotted: str) -> tuple[bool, Any]:
        return get_dotted(self.raw, dotted)

    def set(self, dotted: str, value: Any, reason: str) -> None:
        """Set a vlmtune key and report it (old -> new)."""
        *parents, last = dotted.split(".")
        node = self.raw
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # `training = 5`: the schema names it
                where = ".".join(parents[: depth + 1])
                self.out.problems.append(f"{dotted}: {where} is a value, not a section")
                return
        present, old = self.get(dotted)
        node[last] = value
        self.out.changes.append(SettingChange(dotted, old if present else None, value, reason))

    def move(self, src: str, dst: str, value: Any, reason: str) -> None:
        """Drop ``src`` and set ``dst`` to ``value``, unless ``dst`` says otherwise."""
        present, current = self.get(dst)
        _pop(self.raw, src)
        if present and current != value:
            self.out.problems.append(
                f"{src}: {value!r} contradicts {dst} = {current!r} (the same setting)"
            )
            return
        self.set(dst, value, reason)

    def ignore(self, key: str, reason: str) -> None:
        present, value = self.get(key)
        if present:
            _pop(self.raw, key)
            self.out.ignored.append(IgnoredKey(key, value, reason))

    def refuse(self, key: str, problem: str) -> None:
        if self.get(key)[0]:
            _pop(self.raw, key)
        self.out.problems.append(f"{key}: {problem}")

    def processes(self) -> int | None:
        """compute.gpu_count x compute.nodes, or None where the schema will refuse them."""
        counts = [self.get(f"compute.{key}") for key in ("gpu_count", "nodes")]
        values = [value if present else 1 for present, value in counts]
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            return values[0] * values[1]
        return None


def translate(raw: dict[str, Any]) -> Translation:
    """Rewrite ``raw`` (a parsed TOML job) in place into vlmtune's schema."""
    r = _Rewrite(raw)
    _top_level(r)
    for src, dst in MOVED_KEYS.items():
        present, value = r.get(src)
        if present:
            r.move(src, dst, value, f"from {src}")
    _variety(r)
    _resolve_qlora(r)
    _deepspeed(r)
    _precision(r)
    _batch_and_processes(r)
    _validation_enabled(r)
    _foreign_targets(r)
    for key, reason in IGNORED_KEYS.items():
        r.ignore(key, reason)
    _replicate(r)
    _leftovers(r)
    return r.out


def _top_level(r: _Rewrite) -> None:
    """``model = "..."`` and ``type = "sft"`` at the top, and the method's long name."""
    present, model = r.get("model")
    if present and isinstance(model, str):  # the CLI's fallback for job.model
        r.move("model", "job.model", model, "from model")
    present, method = r.get("algorithm.method")
    if present and isinstance(method, str) and method.lower() in METHODS:
        r.set("algorithm.method", METHODS[method.lower()], "the same method")
    present, kind = r.get("type")
    if present:
        method = r.get("algorithm.method")[1] or "sft"
        if kind == method:
            r.ignore("type", "the method is algorithm.method (and train --type)")
        else:
            r.refuse("type", f"{kind!r} contradicts algorithm.method = {method!r}")


def _variety(r: _Rewrite) -> None:
    """algorithm.variety from train_kind or training.mode, as the hosted CLI sends them."""
    present, mode = r.get("training.mode")
    if present and str(mode) in METHOD_MODES:
        r.ignore("training.mode", "the method is algorithm.method (and train --type)")
    elif present and isinstance(mode, str) and mode.lower() in MODES:
        r.set("training.mode", MODES[mode.lower()], "the same mode")
    present, kind = r.get("hyperparameters.train_kind")
    if present:
        variety = TRAIN_KINDS.get(str(kind).lower())
        if variety is None:
            r.refuse(
                "hyperparameters.train_kind", f"{kind!r} is not one of {', '.join(TRAIN_KINDS)}"
            )
        else:
            if variety == "lora" and r.get("algorithm.variety")[1] == "qlora":
                variety = "qlora"  # QLoRA is parameter-efficient (peft) too
            r.move(
                "hyperparameters.train_kind",
                "algorithm.variety",
                variety,
                f"from train_kind {kind!r}",
            )
    has_variety = r.get("algorithm.variety")[0]
    variety = VARIETY_OF_MODE.get(str(r.get("training.mode")[1]))
    if not has_variety and variety is not None:
        r.set("algorithm.variety", variety, f"training.mode {r.get('training.mode')[1]!r}")


def _resolve_qlora(r: _Rewrite) -> None:
    """``variety = "lora"`` (or ``"qlora"``) with ``use_qlora = true`` is QLoRA.

    Anything else that contradicts QLoRA (``mode = "full"``, ``variety = "fft"``) is
    left for the schema's contradiction check to report.
    """
    use_qlora = r.get("training.use_qlora")[1]
    has_variety, variety = r.get("algorithm.variety")
    has_mode, mode = r.get("training.mode")
    if use_qlora is not True or variety not in (None, "lora", "qlora"):
        return
    if mode not in (None, "lora", "qlora"):
        return
    if variety != "qlora":
        r.set("algorithm.variety", "qlora", QLORA_REASON)
    if has_mode and mode == "lora":
        r.set("training.mode", "qlora", QLORA_REASON)


def _deepspeed(r: _Rewrite) -> None:
    """A ZeRO stage as FSDP2 sharding; after QLoRA, which shards nothing."""
    key = "hyperparameters.parallelism.deepspeed_stage"
    present, stage = r.get(key)
    if not present:
        return
    if r.get("algorithm.variety")[1] == "qlora":
        r.ignore(key, REPLICATE_REASON)
    elif not isinstance(stage, int) or isinstance(stage, bool) or stage not in ZERO_STAGE_SHARDING:
        r.refuse(key, f"{stage!r} is not a DeepSpeed ZeRO stage (0, 1, 2 or 3)")
    elif ZERO_STAGE_SHARDING[stage] is None:
        r.ignore(key, "ZeRO 0/1 keep whole weights per GPU; FSDP2 shards (compute.sharding)")
    elif r.get("compute.sharding")[0]:
        r.ignore(key, "compute.sharding is set")
    else:
        _pop(r.raw, key)
        reason = f"from {key} = {stage}: FSDP2's ZeRO-{stage} sharding"
        r.set("compute.sharding", ZERO_STAGE_SHARDING[stage], reason)


def _precision(r: _Rewrite) -> None:
    """bf16/fp16 flags as training.precision; ``bf16 = true`` is what 'auto' does."""
    bf16_key, fp16_key = keys = [f"hyperparameters.parallelism.{k}" for k in ("bf16", "fp16")]
    (has_bf16, bf16), (has_fp16, fp16) = (r.get(k) for k in keys)
    bad = [k for k, p, v in ((bf16_key, has_bf16, bf16), (fp16_key, has_fp16, fp16))
           if p and not isinstance(v, bool)]  # fmt: skip
    for key in bad:
        r.refuse(key, f"must be true or false (got {r.get(key)[1]!r})")
    if not bad and bf16 is True and fp16 is True:
        r.refuse(fp16_key, "true contradicts bf16 = true (one compute dtype)")
    elif not bad and fp16 is True:
        r.move(fp16_key, "training.precision", "fp16", f"from {fp16_key}")
    elif not bad and bf16 is False:  # neither half type: the hosted trainer computes in fp32
        r.move(bf16_key, "training.precision", "fp32", f"from {bf16_key} = false: full precision")
    precision = r.get("training.precision")[1]
    reason = (
        "training.precision = 'auto' computes in bf16 on GPUs that have it"
        if precision in (None, "auto")
        else f"training.precision = {precision!r} says which"
    )
    for key in keys:  # what is left agrees with the precision chosen
        r.ignore(key, reason)


def _batch_and_processes(r: _Rewrite) -> None:
    """world_size and global_batch: what torchrun and the accumulation steps give."""
    processes = r.processes()
    key = "hyperparameters.world_size"
    present, world = r.get(key)
    if present and processes is not None:
        if world == processes:
            r.ignore(key, f"torchrun starts compute.gpu_count x compute.nodes = {processes}")
        else:
            r.refuse(
                key,
                f"{world!r} processes, but compute.gpu_count x compute.nodes = {processes}: "
                "vlmtune starts one process per GPU (set compute.gpu_count)",
            )
    key = "hyperparameters.global_batch"
    present, total = r.get(key)
    if not present or processes is None:
        return
    per_device = r.get("hyperparameters.per_device_batch")[1] or 1
    has_accum, accum = r.get("hyperparameters.gradient_accumulation_steps")
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (total, per_device)
    ):
        r.refuse(key, f"must be a positive integer (got {total!r})")
        return
    shape = f"per_device_batch {per_device} x {processes} processes"
    if has_accum:
        if isinstance(accum, int) and per_device * accum * processes == total:
            r.ignore(key, f"{shape} x gradient_accumulation_steps {accum}")
        else:
            r.refuse(key, f"{total} is not {shape} x gradient_accumulation_steps {accum!r}")
    elif total % (per_device * processes):
        r.refuse(key, f"{total} is not a multiple of {shape}")
    else:
        _pop(r.raw, key)
        steps = total // (per_device * processes)
        r.set(
            "hyperparameters.gradient_accumulation_steps",
            steps,
            f"from {key} = {total} / ({shape})",
        )


def _validation_enabled(r: _Rewrite) -> None:
    """``[training.validation] enabled``: whether the validation file is evaluated."""
    key = "training.validation.enabled"
    present, enabled = r.get(key)
    if not present:
        return
    has_data, data = r.get("job.validation_data")
    if not isinstance(enabled, bool):
        r.refuse(key, f"must be true or false (got {enabled!r})")
    elif enabled or not has_data:
        why = "job.validation_data is evaluated" if has_data else "there is no job.validation_data"
        r.ignore(key, f"{why}; evaluation runs when it is set")
    else:
        _pop(r.raw, key)
        _pop(r.raw, "job.validation_data")
        r.out.changes.append(SettingChange("job.validation_data", data, None, f"{key} = false"))


def _foreign_targets(r: _Rewrite) -> None:
    present, targets = r.get("lora.target_modules")
    if not present or not isinstance(targets, list):
        return
    foreign = [t for t in targets if isinstance(t, str) and t in FOREIGN_TARGETS]
    kept = [t for t in targets if t not in foreign]
    if foreign and kept:
        names = ", ".join(f"{t!r} ({FOREIGN_TARGETS[t]})" for t in foreign)
        why = (
            f"{names} names no Qwen3-VL module, so it would adapt nothing; "
            "model.freeze_projector = false trains Qwen3-VL's projector (the merger)"
        )
        r.set("lora.target_modules", kept, why)


def _replicate(r: _Rewrite) -> None:
    """QLoRA on several processes trains data-parallel (FSDP2's full_shard otherwise)."""
    processes = r.processes()
    several = processes is not None and processes > 1
    if r.get("algorithm.variety")[1] == "qlora" and several and not r.get("compute.sharding")[0]:
        r.raw["compute"]["sharding"] = "replicate"  # a dict: it holds the process counts
        r.out.changes.append(
            SettingChange("compute.sharding", "full_shard", "replicate", REPLICATE_REASON)
        )


def _leftovers(r: _Rewrite) -> None:
    """A key of a hosted-only table that no table above knows, by its full name."""
    known = {*MOVED_KEYS, *IGNORED_KEYS, "hyperparameters.parallelism.deepspeed_stage"}
    known |= {f"hyperparameters.parallelism.{k}" for k in ("bf16", "fp16")}
    known |= {"training.validation.enabled"}
    for table in HOSTED_TABLES:
        present, node = r.get(table)
        if not present or not isinstance(node, dict):
            continue
        read = sorted(k.removeprefix(f"{table}.") for k in known if k.startswith(f"{table}."))
        for key in list(node):
            r.refuse(
                f"{table}.{key}", f"unknown key (of [{table}], vlmtune reads {', '.join(read)})"
            )


def unserved_model(model: Any, toml_dir: Path) -> str | None:
    """Why ``job.model`` names a model vlmtune does not fine-tune, judged by the name
    before anything is downloaded: the Qwen organisation's other models (text-only
    Qwen3, Qwen3-Coder, earlier VL families) and API models the hosted examples name.
    Any other hub id may be a Qwen3-VL fine-tune: its config.json decides when it loads.
    """
    if not isinstance(model, str) or "\x00" in model:
        return None  # the schema and load_job name what is wrong with it
    from vlmtune.models.registry import hub_id, list_models

    repo = hub_id(model)
    if repo is None:
        return None
    try:
        if (toml_dir / model).is_dir() or Path(model).expanduser().is_dir():
            return None  # a local checkpoint that happens to be named owner/name
    except OSError:  # a name too long for a path is no directory
        pass
    owner, _, name = repo.lower().partition("/")
    if owner == "qwen" and not name.startswith("qwen3-vl-"):
        kind = "a text-only Qwen3 model" if name.startswith("qwen3-") else "not a Qwen3-VL model"
    elif owner in ("openai", "anthropic"):
        kind = "an API model, not open weights to fine-tune"
    else:
        return None
    names = ", ".join(spec.name for spec in list_models())
    return (
        f"job.model: {model!r} is {kind}; vlmtune fine-tunes Qwen3-VL only ({names}, their "
        "short names such as 'qwen3-vl-8b', another Qwen3-VL hub id, or a local Qwen3-VL "
        "checkpoint)"
    )
