"""Where a training step's time goes: wall time per phase, for benchmarks.

The engine times its phases through ``engine.profile`` (``NO_PROFILE`` by default, whose
``phase`` is a shared no-op context, so an unprofiled step pays one attribute lookup
per phase). ``benchmarks/sft_throughput.py --profile`` installs a ``StepProfile`` and
prints the totals. On CUDA every phase boundary synchronises, so a phase is charged
for its own kernels, not for the ones queued before it.

Phases (disjoint): ``data`` (planning + collation of micro-batches), ``forward`` (the
backbone, vision tower included), ``lm_head`` (log-probs at the weighted positions),
``loss``, ``backward``, ``optimizer`` (clip + AdamW + zero grads).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

PHASES = ("data", "forward", "lm_head", "loss", "backward", "optimizer")


class StepProfile:
    """Seconds and calls per phase, summed over every step since the last ``reset``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def table(self, wall_s: float | None = None) -> str:
        """One line per phase: seconds, share of the profiled (or given wall) time."""
        total = sum(self.seconds.values())
        base = wall_s if wall_s else total
        names = [p for p in PHASES if p in self.seconds]
        names += sorted(set(self.seconds) - set(PHASES))
        lines = [f"{'phase':10s} {'seconds':>8s} {'share':>6s} {'calls':>6s}"]
        for name in names:
            s = self.seconds[name]
            lines.append(f"{name:10s} {s:8.2f} {s / base:6.1%} {self.calls[name]:6d}")
        if wall_s:
            other = wall_s - total
            lines.append(f"{'(other)':10s} {other:8.2f} {other / base:6.1%}")
        return "\n".join(lines)


class _NoProfile(StepProfile):
    """Records nothing: the engine's default."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self._null = contextlib.nullcontext()

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return self._null


NO_PROFILE: StepProfile = _NoProfile()
