"""Policies: what answers a task's prompt during collection.

A policy sees one ``Observation`` (the prompt messages, the task's info, the expert's
action when the task reports one) and returns a ``Decision``: a completion text, which
the task parses, or an action, which it plays directly. Episode threads call ``act``
concurrently, so every policy is thread-safe.

- ``random``: a uniformly random action, from the episode's own seeded RNG (the same
  seeds give the same actions, whatever the thread scheduling);
- ``expert``: the task's expert action at this observation;
- ``openai:URL``: any OpenAI-compatible ``/v1/chat/completions`` (``vlmtune serve``'s
  included), the prompt sent as it is, images as the task's data URLs;
- a model directory or name: sampled in this process through the engine, batched
  (``local.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from vlmtune.tasks.protocol import Messages, TaskInfo


class PolicyError(Exception):
    """A policy could not answer (an HTTP error, no expert action): costs one episode."""


class PolicySpecError(ValueError):
    """A ``--policy`` that names no policy; the message says what is accepted."""


@dataclass(frozen=True)
class Observation:
    messages: Messages
    task: TaskInfo
    seed: int
    step: int
    expert_action: str | None  # the task's expert at this observation (None: it has none)


@dataclass(frozen=True)
class Decision:
    """Exactly one of ``completion`` (text for the task to parse) or ``action``."""

    completion: str | None = None
    action: str | None = None


class Policy(Protocol):
    @property
    def name(self) -> str:
        """Stored on each rollout: "random", "expert", "openai:URL", a model."""
        ...

    @property
    def model(self) -> str | None:
        """The model's name, when the policy is one."""
        ...

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        """Answer one observation; ``rng`` is the episode's own (seeded by its seed)."""
        ...

    def close(self) -> None: ...


class RandomPolicy:
    name: str = "random"
    model: str | None = None

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        return Decision(action=rng.choice(observation.task.actions))

    def close(self) -> None:
        pass


class ExpertPolicy:
    name: str = "expert"
    model: str | None = None

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        if observation.expert_action is None:
            raise PolicyError(
                f"task {observation.task.name!r} reported no expert action at step "
                f"{observation.step}"
            )
        return Decision(action=observation.expert_action)

    def close(self) -> None:
        pass


def chat_completions_url(url: str) -> str:
    """``http://h:8000``, ``.../v1`` or ``.../v1/chat/completions`` -> the completions URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIPolicy:
    """Any OpenAI-compatible chat endpoint; one pooled client shared by the episode threads."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 1.0,
        max_tokens: int = 64,
        timeout_s: float = 120.0,
    ) -> None:
        self.url = chat_completions_url(url)
        self.name = f"openai:{url}"
        self.model: str | None = model
        self.temperature, self.max_tokens = temperature, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def act(self, observation: Observation, rng: random.Random) -> Decision:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": observation.messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        try:
            response = self._client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise PolicyError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise PolicyError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}")
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise PolicyError(f"{self.url}: not a chat completion: {response.text[:300]}") from None
        return Decision(completion=content if isinstance(content, str) else "")

    def close(self) -> None:
        self._client.close()


def make_policy(
    spec: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    temperature: float = 1.0,
    max_tokens: int = 64,
    max_batch: int = 8,
) -> Policy:
    """The policy ``spec`` names: ``random``, ``expert``, ``openai:URL`` (needs ``model``),
    or a local model directory or name (loaded now, so a bad one fails before any episode).
    Raises ``PolicySpecError`` for a spec that names none of these."""
    if spec == "random":
        return RandomPolicy()
    if spec == "expert":
        return ExpertPolicy()
    if spec.startswith("openai:"):
        url = spec[len("openai:") :]
        if not url.startswith(("http://", "https://")):
            raise PolicySpecError(f"--policy {spec!r}: expected openai:http(s)://HOST[:PORT]/v1")
        if not model:
            raise PolicySpecError(f"--policy {spec!r} needs --model (the name the endpoint serves)")
        return OpenAIPolicy(
            url, model, api_key=api_key, temperature=temperature, max_tokens=max_tokens
        )
    from vlmtune.traces.local import LocalModelPolicy

    return LocalModelPolicy(
        spec, temperature=temperature, max_tokens=max_tokens, max_batch=max_batch
    )
