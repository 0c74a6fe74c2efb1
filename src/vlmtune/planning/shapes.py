"""Training shapes: named setups (model, context, GPUs, sharding, precision).

``[compute] shape = "qwen3-vl-8b-65k"`` (or ``training_shape_ref``, the name the SDK
uses) fills in every key the shape owns; setting one of those keys by hand as well
is a config error naming the keys, so a run on a shape is exactly that setup.

A shape may set some keys per fine-tuning mode (``mode_settings``): full fine-tuning
of the 8B model at 65k tokens on 4 GPUs needs CPU offload, LoRA there does not and
should not pay for it. ``shape.for_mode(mode)`` is the shape a job of that mode runs.

Only ``tiny-2k-cpu2`` has been run here (tests, on CPU processes). The GPU shapes
are sized with the memory estimator (``vlmtune shapes`` prints it): they are plans
that fit on paper, to be confirmed by a run on the hardware named.

Imports nothing heavy: config loading uses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vlmtune.job_dialect import get_dotted

# Memory torch reports for one GPU of each type (GiB), i.e. what a process can use.
GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 79.1,
    "H200": 139.8,
    "B200": 178.4,
    "A100-80GB": 79.1,
    "A100-40GB": 39.4,
    "L40S": 44.4,
    "L4": 22.0,
    "A10G": 22.0,
}
# Leave this share of a GPU for allocator fragmentation and spikes the estimate misses.
FIT_HEADROOM = 0.9


@dataclass(frozen=True)
class TrainingShape:
    name: str
    model: str
    max_context: int  # tokens per packed row: hyperparameters.sequence_length
    gpu_type: str  # a GPU_MEMORY_GIB key, or "cpu" (processes on the host, gloo)
    gpu_count: int  # GPUs (or CPU processes) per node
    nodes: int = 1
    modes: tuple[Literal["full", "lora", "qlora"], ...] = ("lora",)
    sharding: Literal["full_shard", "shard_grad_op", "replicate"] = "full_shard"
    precision: Literal["bf16", "fp32"] = "bf16"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = True
    cpu_offload: bool = False
    description: str = ""
    # Per fine-tuning mode, fields that differ from the ones above (see for_mode).
    mode_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    @property
    def world_size(self) -> int:
        return self.gpu_count * self.nodes

    def for_mode(self, mode: str) -> TrainingShape:
        """The shape a job of ``mode`` (full, lora, qlora) runs: its mode settings applied."""
        return replace(self, **self.mode_settings.get(mode, {}))

    def owned_keys(self) -> dict[str, Any]:
        """The job-file keys this shape sets, dotted, with their values."""
        device = {"training.device": "cpu"} if self.gpu_type == "cpu" else {}
        return {
            **device,
            "job.model": self.model,
            "hyperparameters.sequence_length": self.max_context,
            "compute.gpu_type": self.gpu_type,
            "compute.gpu_count": self.gpu_count,
            "compute.nodes": self.nodes,
            "compute.sharding": self.sharding,
            "compute.reduce_dtype": self.reduce_dtype,
            "compute.cpu_offload": self.cpu_offload,
            "training.precision": self.precision,
            "training.gradient_checkpointing": self.activation_checkpointing,
        }

    def engine_settings(self) -> dict[str, Any]:
        """The same settings as ``EngineConfig`` keywords (the SDK's training_shape_ref)."""
        return {
            "max_row_tokens": self.max_context,
            "precision": self.precision,
            "gradient_checkpointing": self.activation_checkpointing,
            "fsdp_reshard_after_forward": self.sharding == "full_shard",
            "fsdp_reduce_dtype": self.reduce_dtype,
            "fsdp_cpu_offload": self.cpu_offload,
            "replicate": self.sharding == "replicate",
        }


def _gpu(
    name: str, model: str, context: int, gpus: int, modes: tuple, nodes: int = 1, **kw: Any
) -> TrainingShape:
    return TrainingShape(name, model, context, "H100", gpus, nodes, modes, **kw)


_SHAPES: tuple[TrainingShape, ...] = (
    TrainingShape(
        "tiny-2k-cpu2",
        "tiny-qwen3-vl",
        2048,
        "cpu",
        2,
        modes=("full", "lora"),
        precision="fp32",
        activation_checkpointing=False,
        description="the tiny model on two CPU processes (gloo): tests and demos",
    ),
    _gpu("qwen3-vl-2b-32k", "Qwen/Qwen3-VL-2B-Instruct", 32_768, 1, ("full", "lora", "qlora")),
    _gpu("qwen3-vl-4b-32k", "Qwen/Qwen3-VL-4B-Instruct", 32_768, 1, ("lora", "qlora")),
    _gpu("qwen3-vl-8b-32k", "Qwen/Qwen3-VL-8B-Instruct", 32_768, 4, ("full", "lora")),
    # QLoRA is data-parallel: each GPU holds the 4-bit base, LoRA gradients are all-reduced.
    _gpu(
        "qwen3-vl-8b-32k-qlora-x2",
        "Qwen/Qwen3-VL-8B-Instruct",
        32_768,
        2,
        ("qlora",),
        sharding="replicate",
        description="QLoRA data-parallel on two GPUs (the hosted trainer's use_qlora jobs)",
    ),
    # Full fine-tuning at 65k on 4 x 80 GB: fp32 master weights, grads and AdamW state
    # (~31 GiB per GPU sharded over 4) do not fit next to 38 GiB of checkpointed
    # activations; CPU offload moves them to host memory (vlmtune plan shows the sums).
    _gpu(
        "qwen3-vl-8b-65k",
        "Qwen/Qwen3-VL-8B-Instruct",
        65_536,
        4,
        ("full", "lora"),
        mode_settings={"full": {"cpu_offload": True}},
        description="65k-token rows on 4 GPUs; full fine-tuning offloads its shards and "
        "AdamW state to host memory",
    ),
    _gpu("qwen3-vl-32b-32k", "Qwen/Qwen3-VL-32B-Instruct", 32_768, 8, ("lora",)),
    _gpu("qwen3-vl-30b-a3b-32k", "Qwen/Qwen3-VL-30B-A3B-Instruct", 32_768, 4, ("lora",)),
    _gpu(
        "qwen3-vl-235b-a22b-16k",
        "Qwen/Qwen3-VL-235B-A22B-Instruct",
        16_384,
        8,
        ("lora",),
        nodes=2,
    ),
)
_BY_NAME = {s.name: s for s in _SHAPES}


class UnknownShapeError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def list_shapes() -> list[TrainingShape]:
    return list(_SHAPES)


# The hosted service's resource name of a shape (its SDK's training_shape_ref).
_RESOURCE_NAME = re.compile(r"accounts/[^/]+/trainingShapes/([^/]+)(?:/versions/[^/]+)?")


def get_shape(name: str) -> TrainingShape:
    """A shape by name, or by ``accounts/<a>/trainingShapes/<name>[/versions/<v>]``."""
    key = name.strip()
    resource = _RESOURCE_NAME.fullmatch(key)
    shape = _BY_NAME.get((resource.group(1) if resource else key).lower())
    if shape is None:
        raise UnknownShapeError(f"unknown training shape {name!r}; known: {', '.join(_BY_NAME)}")
    return shape


def gpu_memory_gib(gpu_type: str) -> float | None:
    """Usable memory of one GPU of ``gpu_type`` (None: unknown type, or the CPU)."""
    key = gpu_type.strip().upper()
    for name, gib in GPU_MEMORY_GIB.items():
        if name.upper() == key:
            return gib
    return None


def apply_shape(raw: dict[str, Any]) -> list[str]:
    """Fill the shape named in ``raw['compute']`` into the raw job dict, in place.

    Returns problems, each naming its key: an unknown shape, both ``shape`` and
    ``training_shape_ref`` given, or keys the shape owns that were also set by hand.
    """
    compute = raw.get("compute")
    if not isinstance(compute, dict):
        return []
    names = {k: compute[k] for k in ("shape", "training_shape_ref") if compute.get(k) is not None}
    if not names:
        return []
    if len(names) == 2:
        return ["compute.shape: set either shape or training_shape_ref, not both"]
    key, name = next(iter(names.items()))
    try:
        shape = get_shape(str(name)).for_mode(_raw_mode(raw))
    except UnknownShapeError as e:
        return [f"compute.{key}: {e}"]
    owned = shape.owned_keys()
    clashes = [dotted for dotted in owned if get_dotted(raw, dotted)[0]]
    if clashes:
        return [
            f"{dotted}: set by training shape {shape.name!r} (compute.{key}); remove it from "
            "the job file or drop the shape"
            for dotted in clashes
        ]
    for dotted, value in owned.items():
        section, leaf = dotted.split(".")
        node = raw.setdefault(section, {})
        if isinstance(node, dict):
            node[leaf] = value
    return []


def _raw_mode(raw: dict[str, Any]) -> str:
    """The fine-tuning mode of a raw (translated, not yet validated) job dict."""
    present, variety = get_dotted(raw, "algorithm.variety")
    variety = variety if present else "lora"  # the schema's default
    return "full" if variety == "fft" else str(variety)
