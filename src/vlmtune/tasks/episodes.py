"""The episode layer every task shares, and the in-process client.

``Episodes`` holds the open episodes of one task class: one task instance each, behind
a random hex id. It turns a ``StepRequest`` into an action (parsing a completion with
the task's ``parse``; a completion naming no action plays ``info.invalid_action``, or,
when the task has none, ends the episode with reward 0), truncates at
``info.max_steps``, and reports the expert:

* ``EpisodeStart.expert_action`` and ``StepResult.next_expert_action`` are the expert's
  action at the prompt they come with: what an expert policy plays next;
* ``StepInfo.expert_action`` is the expert's action at the observation the step acted
  on, i.e. at the prompt the completion answered (the same value the previous call
  reported as the next expert action), so ``vlmtune filter`` can relabel that very step.

The expert is asked once per observation, so a stateful expert sees each one exactly once.

Episodes nobody closes are dropped after ``ttl_s`` idle seconds, and at most
``max_open`` stay open (the least recently used goes first), so a collector that leaks
episodes cannot exhaust the app's memory.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.tasks.protocol import (
    EpisodeRequest,
    EpisodeStart,
    StepInfo,
    StepOutcome,
    StepRequest,
    StepResult,
    Task,
    TaskError,
    TaskInfo,
)
from vlmtune.tasks.registry import task_class

T = TypeVar("T")
DEFAULT_TTL_S = 900.0
DEFAULT_MAX_OPEN = 1024


@dataclass
class _Episode:
    task: Task | None  # None once the episode is over (frees the environment's memory)
    image_only: bool
    expert_action: str | None  # the expert's action at the current observation
    owner: str | None = None  # the tenant that started it (None: no tenants, e.g. standalone)
    steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _visible(episode: _Episode, owner: str | None) -> bool:
    return owner is None or episode.owner == owner


class Episodes:
    """The open episodes of one task class (thread-safe)."""

    def __init__(
        self,
        task_cls: type[Task],
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_open: int = DEFAULT_MAX_OPEN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_open < 1 or ttl_s <= 0:
            raise ValueError("max_open must be >= 1 and ttl_s > 0")
        self.task_cls = task_cls
        self.info: TaskInfo = task_cls.info
        self.ttl_s = ttl_s
        self.max_open = max_open
        self.clock = clock
        # id -> (episode, last used); oldest use first, so eviction pops from the front.
        self._open: OrderedDict[str, tuple[_Episode, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def start(self, request: EpisodeRequest, owner: str | None = None) -> EpisodeStart:
        if request.split not in self.info.splits:
            raise BadRequest(
                f"unknown split {shown(request.split)} for task {self.info.name!r} "
                f"(splits: {', '.join(self.info.splits)})"
            )
        task = self.task_cls()
        task.reset(request.seed, request.split)
        messages = task.prompt(request.image_only)
        expert = task.expert()
        episode_id = secrets.token_hex(12)
        with self._lock:
            self._evict(self.clock(), adding=True)
            episode = _Episode(task, request.image_only, expert, owner)
            self._open[episode_id] = (episode, self.clock())
        return EpisodeStart(episode_id=episode_id, messages=messages, expert_action=expert)

    def step(self, episode_id: str, request: StepRequest, owner: str | None = None) -> StepResult:
        """``owner``: the caller's tenant; another tenant's episode answers as an unknown
        id (None: every episode, as for an operator or a server without tenants)."""
        episode = self._touch(episode_id, owner)
        with episode.lock:
            task = episode.task
            if task is None:
                raise BadRequest(f"episode {episode_id} is over; start a new one")
            action = self._action(task, request)
            valid = action is not None
            played = action if valid else self.info.invalid_action
            acted_on = episode.expert_action
            if played is not None:
                outcome = task.step(played)
            else:  # no action and no fallback: the episode ends here, unrewarded
                outcome = StepOutcome(reward=0.0, done=True)
            episode.steps += 1
            truncated = not outcome.done and episode.steps >= self.info.max_steps
            done = outcome.done or truncated
            messages, next_expert = None, None
            if done:
                episode.task = None
            else:
                messages = task.prompt(episode.image_only)
                next_expert = episode.expert_action = task.expert()
        return StepResult(
            reward=outcome.reward,
            done=done,
            truncated=truncated,
            info=StepInfo(
                valid_action=valid,
                action=played,
                achievements=outcome.achievements,
                expert_action=acted_on,
                extra=outcome.extra,
            ),
            messages=messages,
            next_expert_action=next_expert,
        )

    def close(self, episode_id: str, owner: str | None = None) -> None:
        with self._lock:
            found = self._open.get(episode_id)
            if found is None or not _visible(found[0], owner):
                raise NotFound(self._unknown(episode_id))
            del self._open[episode_id]

    def _action(self, task: Task, request: StepRequest) -> str | None:
        if request.action is not None:
            if request.action not in self.info.actions:
                raise BadRequest(
                    f"unknown action {shown(request.action)} for task {self.info.name!r} "
                    f"(allowed: {', '.join(self.info.actions)})"
                )
            return request.action
        assert request.completion is not None  # StepRequest holds exactly one
        action = task.parse(request.completion)
        if action is not None and action not in self.info.actions:
            raise RuntimeError(f"{self.info.name}.parse returned {action!r}, not an action")
        return action

    def _touch(self, episode_id: str, owner: str | None) -> _Episode:
        with self._lock:
            now = self.clock()
            self._evict(now, adding=False)
            found = self._open.get(episode_id)
            if found is None or not _visible(found[0], owner):
                raise NotFound(self._unknown(episode_id))
            self._open[episode_id] = (found[0], now)
            self._open.move_to_end(episode_id)
            return found[0]

    def _evict(self, now: float, adding: bool) -> None:
        """Drop idle episodes, and when ``adding`` one, the least recently used while at
        the cap (lock held)."""
        while self._open:
            _, (_, used) = next(iter(self._open.items()))
            full = adding and len(self._open) >= self.max_open
            if now - used <= self.ttl_s and not full:
                return
            self._open.popitem(last=False)

    def _unknown(self, episode_id: str) -> str:
        return (
            f"unknown episode {shown(episode_id)} for task {self.info.name!r} (closed, or "
            f"dropped after {self.ttl_s:g} s idle or past {self.max_open} open episodes)"
        )


class LocalTaskClient:
    """A ``TaskClient`` in this process: the same answers as ``HttpTaskClient`` over the
    same task, without the wire. Refusals raise ``TaskError`` with the HTTP status; an
    unknown task name raises ``UnknownTask`` here, at construction."""

    def __init__(
        self,
        task: str | type[Task],
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_open: int = DEFAULT_MAX_OPEN,
    ) -> None:
        cls = task_class(task) if isinstance(task, str) else task
        self.episodes = Episodes(cls, ttl_s=ttl_s, max_open=max_open)

    def info(self) -> TaskInfo:
        return self.episodes.info

    def start(self, request: EpisodeRequest, owner: str | None = None) -> EpisodeStart:
        return _refusals(lambda: self.episodes.start(request))

    def step(self, episode_id: str, request: StepRequest) -> StepResult:
        return _refusals(lambda: self.episodes.step(episode_id, request))

    def close(self, episode_id: str) -> None:
        _refusals(lambda: self.episodes.close(episode_id))


def _refusals(call: Callable[[], T]) -> T:
    """``call()``, with the episode layer's refusals as the ``TaskError`` HTTP would give."""
    try:
        return call()
    except BadRequest as e:
        raise TaskError(400, str(e)) from None
    except NotFound as e:
        raise TaskError(404, str(e)) from None
