"""Logprob and sampling helpers, and the small LRU of engines for saved and base models.

Training runs sample on their own worker (their live weights, or a snapshot swapped
in for the call). Saved sampler checkpoints, promoted models and base models are
served by engines in ``ModelPool``: at most ``capacity`` stay loaded, each with one
thread so calls on an engine never overlap, and the least recently used is dropped
when another is needed (bounding memory, which a busy server would otherwise fill).
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch

from vlmtune.engine import dispatch, losses
from vlmtune.engine.engine import TrainingEngine
from vlmtune.types import (
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)

T = TypeVar("T")


def prompt_logprobs(engine: TrainingEngine, prompt: ModelInput) -> list[float | None]:
    """``log p(token_t | tokens_<t)`` for every prompt position; the first is None."""
    ids = prompt.to_ints(engine.image_token_id)
    if len(ids) < 2:
        return [None] * len(ids)
    datum = Datum(
        model_input=prompt,
        loss_fn_inputs={
            "target_tokens": TensorData(data=ids[1:] + [0], dtype="int64"),
            "weights": TensorData(data=[1.0] * (len(ids) - 1) + [0.0], dtype="float32"),
        },
    )
    lps = engine.forward([datum]).loss_fn_outputs[0]["logprobs"].data
    return [None, *[float(x) for x in lps[:-1]]]


def sample(
    engine: TrainingEngine,
    prompt: ModelInput,
    num_samples: int,
    params: SamplingParams,
    with_prompt_logprobs: bool = False,
    last_n: int | None = None,
) -> SampleResponse:
    sequences = engine.sample([prompt], num_samples, params)[0].sequences
    lps = None
    if with_prompt_logprobs:
        lps = prompt_logprobs(engine, prompt)
        if last_n is not None:
            skipped: list[float | None] = [None] * max(0, len(lps) - last_n)
            lps = skipped + lps[-last_n:]
    for s in sequences:  # NaN cannot go into JSON; -inf would round-trip badly too
        if s.logprobs is not None:
            s.logprobs = [x if math.isfinite(x) else -1e30 for x in s.logprobs]
    return SampleResponse(sequences=list(sequences), prompt_logprobs=lps)


def forward_all_positions(
    engine: TrainingEngine, datums: list[Datum], loss_fn: str, config: dict
) -> ForwardBackwardOutput:
    """Logprobs at every position (Tinker's ``forward``) and the loss; no gradients.

    ``engine.forward`` computes logprobs only where the loss needs them (zeros
    elsewhere), but a client computing its own loss from ``forward`` needs them all:
    so the pass runs with weight 1 everywhere, and the requested loss is computed
    here from those logprobs with the engine's own loss functions.
    """
    spec = losses.loss_spec(loss_fn)
    probe = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": TensorData(data=[1.0] * d.model_input.length, dtype="float32"),
            },
        )
        for d in datums
    ]
    out = engine.forward(probe, "cross_entropy")
    totals: dispatch.MetricTotals = {}
    for d, o in zip(datums, out.loss_fn_outputs, strict=True):
        lp = torch.tensor(o["logprobs"].data, dtype=torch.float32)[None]
        inp = {
            k: torch.tensor(v.data, dtype=torch.float32)[None] for k, v in d.loss_fn_inputs.items()
        }
        _, m = spec(lp, inp, config)
        dispatch.add_metrics(totals, m)  # ``:sum`` metrics add up; means are per datum
    return ForwardBackwardOutput(
        loss_fn_outputs=out.loss_fn_outputs, metrics=dispatch.final_metrics(totals)
    )


class _Slot:
    def __init__(self) -> None:
        self.engine: TrainingEngine | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="infer")
        self.lock = threading.Lock()

    def retire(self) -> None:
        # Queued calls still run; then the engine goes with the slot.
        self.executor.shutdown(wait=False)


class ModelPool:
    """Loaded inference engines, least recently used first out."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = max(1, capacity)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = threading.Lock()

    def run(
        self, key: str, loader: Callable[[], TrainingEngine], fn: Callable[[TrainingEngine], T]
    ) -> concurrent.futures.Future:
        """Schedule ``fn(engine)`` on the engine for ``key`` (loaded on first use)."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
            self._slots.move_to_end(key)
            while len(self._slots) > self.capacity:
                _, old = self._slots.popitem(last=False)
                old.retire()

        def task() -> T:
            with slot.lock:
                if slot.engine is None:
                    slot.engine = loader()
                engine = slot.engine
            with torch.no_grad():
                return fn(engine)

        return slot.executor.submit(task)

    def loaded(self) -> list[str]:
        with self._lock:
            return [k for k, s in self._slots.items() if s.engine is not None]

    def drop(self, key: str) -> None:
        """Let go of ``key``'s engine (calls already queued on it still run); the next
        call for ``key`` loads it again. A deployment does this when its weights change."""
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is not None:
            slot.retire()

    def close(self) -> None:
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for s in slots:
            s.retire()
