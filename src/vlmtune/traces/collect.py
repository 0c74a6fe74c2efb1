"""Collection: run a policy for N episodes over a task, ``concurrency`` at a time, and
store every step.

The collector owns the loop (the task app never calls a model): start an episode, ask
the policy, step, store, until the task says done. Whatever goes wrong inside one
episode (the task refuses, the policy's endpoint fails or times out, a bug) is recorded
on that rollout as its ``error`` and the run goes on; only the store failing stops it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from vlmtune.tasks.protocol import EpisodeRequest, StepRequest, TaskClient, TaskInfo
from vlmtune.traces.policies import Observation, Policy
from vlmtune.traces.store import Step, TraceStore

_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class CollectConfig:
    episodes: int
    concurrency: int = 1
    split: str = "train"
    seed_start: int = 0
    image_only: bool = False


@dataclass(frozen=True)
class EpisodeOutcome:
    seed: int
    rollout_id: str
    episode_return: float
    steps: int
    valid_steps: int
    achievements: list[str]
    success: bool | None
    error: str | None


@dataclass
class CollectSummary:
    """What a collection did. Returns and rates are over the episodes without an error."""

    task: str
    policy: str
    episodes: int
    errors: int
    steps: int  # env steps taken, in every episode
    wall_s: float
    frames_per_s: float  # env steps per second of wall time
    mean_return: float | None
    success_rate: float | None  # None: the task has no success threshold
    mean_achievements: float | None  # None: the task names no achievements
    achievement_rates: dict[str, float] = field(default_factory=dict)
    valid_action_share: float | None = None  # valid steps / steps
    error_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [
            f"{self.task} / {self.policy}: {self.episodes} episodes, {self.errors} with an "
            f"error, {self.steps} steps in {self.wall_s:.1f} s ({self.frames_per_s:.1f} frames/s)"
        ]
        if self.mean_return is not None:
            lines.append(f"  mean return: {self.mean_return:.3f}")
        if self.success_rate is not None:
            lines.append(f"  success rate: {self.success_rate:.1%}")
        if self.mean_achievements is not None:
            lines.append(f"  achievements per episode: {self.mean_achievements:.2f}")
            for name, rate in sorted(self.achievement_rates.items(), key=lambda kv: -kv[1]):
                if rate > 0:
                    lines.append(f"    {name}: {rate:.1%}")
        if self.valid_action_share is not None:
            lines.append(f"  valid actions: {self.valid_action_share:.1%}")
        for example in self.error_examples:
            lines.append(f"  error: {example}")
        return "\n".join(lines)


def _episode(
    client: TaskClient,
    policy: Policy,
    store: TraceStore,
    info: TaskInfo,
    config: CollectConfig,
    seed: int,
) -> EpisodeOutcome:
    rollout_id = store.start_rollout(
        task=info.name,
        split=config.split,
        seed=seed,
        policy=policy.name,
        model=policy.model,
        image_only=config.image_only,
    )
    rng = random.Random(f"{info.name}:{config.split}:{seed}")
    total, steps, valid, achievements = 0.0, 0, 0, list[str]()
    error: str | None = None
    episode_id: str | None = None
    try:
        start = client.start(
            EpisodeRequest(seed=seed, split=config.split, image_only=config.image_only)
        )
        episode_id, messages, expert = start.episode_id, start.messages, start.expert_action
        while True:
            observation = Observation(messages, info, seed, steps, expert)
            decision = policy.act(observation, rng)
            request = StepRequest(completion=decision.completion, action=decision.action)
            result = client.step(episode_id, request)
            step_info = result.info
            store.add_step(
                Step(
                    rollout_id=rollout_id,
                    index=steps,
                    prompt=messages,
                    completion=decision.completion,
                    action=step_info.action,
                    valid_action=step_info.valid_action,
                    reward=result.reward,
                    done=result.done,
                    expert_action=step_info.expert_action,
                    info={
                        "achievements": step_info.achievements,
                        "truncated": result.truncated,
                        **step_info.extra,
                    },
                )
            )
            steps += 1
            total += result.reward
            valid += int(step_info.valid_action)
            achievements += [a for a in step_info.achievements if a not in achievements]
            if result.done:
                break
            if result.messages is None:
                raise RuntimeError(f"task {info.name!r} sent no next prompt before the end")
            if steps >= info.max_steps:
                raise RuntimeError(f"task {info.name!r} did not end after max_steps={steps}")
            messages, expert = result.messages, result.next_expert_action
    except Exception as exc:  # one episode's failure is recorded, never the run's
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        if episode_id is not None:
            # Frees the app's slot; an episode it already dropped is no loss to this run.
            with contextlib.suppress(Exception):
                client.close(episode_id)
    success = None
    if info.success_threshold is not None and error is None:
        success = total >= info.success_threshold
    store.finish_rollout(
        rollout_id,
        episode_return=total,
        steps=steps,
        success=success,
        achievements=achievements,
        error=error,
    )
    return EpisodeOutcome(seed, rollout_id, total, steps, valid, achievements, success, error)


def summarize(
    info: TaskInfo, policy: str, outcomes: list[EpisodeOutcome], wall_s: float
) -> CollectSummary:
    ok = [o for o in outcomes if o.error is None]
    steps = sum(o.steps for o in outcomes)
    successes = [o.success for o in ok if o.success is not None]
    counts: Counter[str] = Counter(a for o in ok for a in o.achievements)
    return CollectSummary(
        task=info.name,
        policy=policy,
        episodes=len(outcomes),
        errors=len(outcomes) - len(ok),
        steps=steps,
        wall_s=wall_s,
        frames_per_s=steps / wall_s if wall_s > 0 else 0.0,
        mean_return=sum(o.episode_return for o in ok) / len(ok) if ok else None,
        success_rate=(
            sum(successes) / len(successes)
            if info.success_threshold is not None and successes
            else None
        ),
        mean_achievements=(
            sum(len(o.achievements) for o in ok) / len(ok) if info.achievements and ok else None
        ),
        achievement_rates=(
            {a: counts[a] / len(ok) for a in info.achievements} if info.achievements and ok else {}
        ),
        valid_action_share=sum(o.valid_steps for o in outcomes) / steps if steps else None,
        error_examples=[f"seed {o.seed}: {o.error}" for o in outcomes if o.error][:_ERRORS_SHOWN],
    )


def collect(
    client: TaskClient, policy: Policy, store: TraceStore, config: CollectConfig
) -> CollectSummary:
    """Run ``config.episodes`` episodes (seeds ``seed_start`` on) and store every step.

    The task's info is read first (a task that cannot answer ``/info`` raises here, before
    any episode). The store is flushed before the summary is returned, so every step the
    summary counts is on disk.
    """
    info = client.info()
    store.put_task(info.name, info.model_dump())
    seeds = range(config.seed_start, config.seed_start + config.episodes)
    began = time.perf_counter()
    pool = ThreadPoolExecutor(max(1, config.concurrency), thread_name_prefix="episode")
    try:
        outcomes = list(pool.map(lambda s: _episode(client, policy, store, info, config, s), seeds))
    except BaseException:  # Ctrl-C: the episodes not started yet never start
        pool.shutdown(wait=True, cancel_futures=True)
        store.flush()
        raise
    pool.shutdown()
    store.flush()  # a step counts once it is on disk
    wall_s = time.perf_counter() - began
    return summarize(info, policy.name, outcomes, wall_s)
