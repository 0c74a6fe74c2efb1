"""Whether an estimate fits a GPU, and if not, which part is too big and what helps.

A plan that does not fit says by how much, lists the terms largest first with what
each holds (``MemoryEstimate.parts``), and re-estimates the job with each setting that
moves memory (activation checkpointing, CPU offload, twice the GPUs) so the user sees
the numbers each change gives rather than a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmtune.planning.memory import GIB, MemoryEstimate
from vlmtune.planning.shapes import FIT_HEADROOM, gpu_memory_gib

TERMS = ("weights", "grads", "optimizer", "activations", "overhead")


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def usable_bytes(gpu_type: str) -> int | None:
    """What a plan may use of one GPU of ``gpu_type`` (None: unknown type, or the CPU)."""
    capacity = gpu_memory_gib(gpu_type)
    return None if capacity is None else int(FIT_HEADROOM * capacity * GIB)


def fits(estimate: MemoryEstimate, gpu_type: str) -> bool | None:
    """Whether the estimate fits one GPU of ``gpu_type`` with headroom (None: unknown type)."""
    usable = usable_bytes(gpu_type)
    return None if usable is None else estimate.total <= usable


def breakdown(estimate: MemoryEstimate) -> list[str]:
    """One line per term, largest first, with its parts."""
    lines = []
    for term in sorted(TERMS, key=lambda t: -getattr(estimate, t)):
        size = getattr(estimate, term)
        if not size:
            continue
        parts = estimate.term_parts(term)
        inner = "; ".join(f"{what} {gib(b)}" for what, b in parts if b) if len(parts) > 1 else ""
        if term == "activations" and estimate.activation_phase:
            inner = f"peak in the {estimate.activation_phase}: {inner}"
        elif term == "overhead":
            inner = "CUDA context, cuBLAS workspace, NCCL buffers"
        elif len(parts) == 1:
            inner = parts[0][0]
        lines.append(f"{term} {gib(size)} GiB" + (f" ({inner})" if inner else ""))
    return lines


def shortfall(estimate: MemoryEstimate, gpu_type: str) -> list[str]:
    """Why ``estimate`` does not fit ``gpu_type`` (empty when it fits or the GPU is unknown)."""
    usable = usable_bytes(gpu_type)
    if usable is None or estimate.total <= usable:
        return []
    capacity = gpu_memory_gib(gpu_type)
    over = estimate.total - usable
    largest = max(TERMS, key=lambda t: getattr(estimate, t))
    head = (
        f"does not fit: {gib(estimate.total)} GiB per GPU against {gib(usable)} usable "
        f"({FIT_HEADROOM:.0%} of {gpu_type}'s {capacity:.1f}): over by {gib(over)} GiB; "
        f"the largest term is {largest}, {gib(getattr(estimate, largest))} GiB"
    )
    return [head, *breakdown(estimate)]


def remedies(
    estimate_with: Callable[..., MemoryEstimate], settings: dict[str, Any], gpu_type: str
) -> list[str]:
    """The total each single change gives: ``estimate_with(**changes)`` re-estimates."""
    tries: list[tuple[str, dict[str, Any]]] = []
    if not settings.get("activation_checkpointing"):
        tries.append(("activation checkpointing on", {"activation_checkpointing": True}))
    if not settings.get("cpu_offload") and settings.get("mode") != "qlora":
        tries.append(("CPU offload on (compute.cpu_offload = true)", {"cpu_offload": True}))
    if not settings.get("activation_checkpointing") and not settings.get("cpu_offload"):
        both = {"activation_checkpointing": True, "cpu_offload": True}
        tries.append(("both of those", both))
    n = settings.get("world_size", 1)
    tries.append((f"{2 * n} GPUs instead of {n}", {"world_size": 2 * n}))
    usable = usable_bytes(gpu_type)
    out = []
    for what, change in tries:
        est = estimate_with(**change)
        verdict = "fits" if usable is not None and est.total <= usable else "still over"
        host = f", {gib(est.host)} GiB host per process" if est.host else ""
        out.append(f"with {what}: {gib(est.total)} GiB per GPU ({verdict}{host})")
    return out
