"""A local model as a policy: the episode threads' prompts sampled together, in batches.

Each episode thread submits its prompt and waits; one sampler thread takes whatever is
queued (up to ``max_batch``, waiting ``gather_s`` for stragglers once it has one) and
samples the lot in one ``engine.sample`` call. Prompts go through the data layer's
parser and the engine's renderer, as in training and ``vlmtune serve``, so the model
sees exactly the layout it was trained on.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmtune.tasks.protocol import Messages
from vlmtune.traces.policies import Decision, Observation, PolicyError, PolicySpecError
from vlmtune.types import SamplingParams

if TYPE_CHECKING:
    from vlmtune.engine.engine import TrainingEngine
    from vlmtune.types import ModelInput

GATHER_S = 0.01  # how long a batch waits for more prompts once it has one


@dataclass
class _Request:
    messages: Messages
    future: Future[str]


def load_engine(spec: str) -> TrainingEngine:
    """An inference engine for a model directory (full or LoRA adapter) or a model name;
    ``PolicySpecError`` when ``spec`` is neither (nothing is downloaded)."""
    from vlmtune.engine.inference import load_inference_engine
    from vlmtune.models.loading import resolve_model_path

    try:
        resolve_model_path(spec)  # only what is here already: a typo is not a download
    except (OSError, ValueError) as exc:
        raise PolicySpecError(
            f"--policy {spec!r}: not random, expert or openai:URL, and not a model here: {exc}"
        ) from None
    return load_inference_engine(spec)


class LocalModelPolicy:
    """A model sampled in this process; ``act`` is called from many threads at once."""

    def __init__(
        self,
        spec: str,
        *,
        temperature: float = 1.0,
        max_tokens: int = 64,
        max_batch: int = 8,
        gather_s: float = GATHER_S,
        engine: TrainingEngine | None = None,
    ) -> None:
        self.name = spec
        self.model: str | None = spec
        self.engine = engine or load_engine(spec)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        self.max_batch = max(1, max_batch)
        self.gather_s = gather_s
        self.batches: list[int] = []  # the size of every batch sampled, for reports and tests
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="policy-sampler", daemon=True)
        self._thread.start()

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        request = _Request(observation.messages, Future())
        self._queue.put(request)
        return Decision(completion=request.future.result())

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.gather_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._sample(batch)
            if stop:
                return

    def _sample(self, batch: list[_Request]) -> None:
        from vlmtune.data.rows import parse_messages

        renderer = self.engine.renderer
        ready: list[tuple[_Request, ModelInput]] = []
        for request in batch:  # a prompt that cannot be rendered costs its episode only
            try:
                messages = parse_messages(request.messages, kind="rl")
                ready.append((request, renderer.render_prompt(messages).model_input))
            except Exception as exc:
                request.future.set_exception(PolicyError(f"prompt not renderable: {exc}"))
        if not ready:
            return
        self.batches.append(len(ready))
        try:
            out = self.engine.sample([m for _, m in ready], 1, self.params)
        except Exception as exc:
            for request, _ in ready:
                request.future.set_exception(PolicyError(f"sampling failed: {exc}"))
            return
        stop_ids = set(renderer.stop_token_ids)
        for (request, _), response in zip(ready, out, strict=True):
            tokens = [t for t in response.sequences[0].tokens if t not in stop_ids]
            request.future.set_result(renderer.decode(tokens))
