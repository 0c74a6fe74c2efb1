"""The task-app protocol: what travels between a collector and a task app.

A task app is an environment behind four HTTP routes (FastAPI, like the server); the
collector owns the policy loop, so the app never calls a model:

    GET    /info                    -> TaskInfo
    POST   /episodes                EpisodeRequest -> EpisodeStart
    POST   /episodes/{id}/step      StepRequest    -> StepResult
    DELETE /episodes/{id}           -> {"deleted": id}

Prompts are chat messages in vlmtune's data format (OpenAI style: ``content`` is a
string or a list of ``text`` / ``image_url`` parts, images as ``data:`` URLs), so a
prompt a task returns is, unchanged, a training row's prompt.

A task itself is a small class (``Task`` below): one instance per episode. The same
class runs in-process (``LocalTaskClient``), standalone (``vlmtune tasks serve NAME``)
or mounted under ``vlmtune serve`` (``/tasks/NAME/...``, the server's keys).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlmtune.protocol.wire import INT64_MAX, WireModel

Messages = list[dict[str, Any]]  # chat messages in vlmtune's data format


class _Wire(WireModel):
    # A WireModel, so the server's body parsing and schema helpers take it; unlike the
    # server's bodies, an unknown field is an error (a typo must not pass silently).
    model_config = ConfigDict(extra="forbid")


class TaskInfo(_Wire):
    """What a task is: the collector and ``vlmtune filter`` read this, never guess."""

    name: str
    description: str
    actions: list[str] = Field(description="every action the task accepts, by name")
    max_steps: int = Field(ge=1, description="an episode is truncated after this many steps")
    splits: list[str] = Field(description="seed splits, e.g. ['train', 'test']")
    # A list, not a tuple: OpenAPI tools reject the schema pydantic writes for tuples.
    image_size: list[int] = Field(
        min_length=2, max_length=2, description="[width, height] of each frame"
    )
    modes: list[str] = Field(
        default=["default", "image_only"],
        description="prompt modes; image_only prompts carry the image and no text",
    )
    has_expert: bool = Field(description="steps report the task's expert action")
    success_threshold: float | None = Field(
        default=None,
        description="an episode whose return reaches this counts as a success "
        "(None: the task has no notion of success, e.g. Crafter's achievements)",
    )
    achievements: list[str] = Field(
        default=[], description="named achievements a step's info may report"
    )
    invalid_action: str | None = Field(
        default=None,
        description="the action taken when a completion names none (e.g. Crafter's noop); "
        "None: such a step ends the episode with reward 0",
    )


class EpisodeRequest(_Wire):
    seed: int = Field(ge=0, le=INT64_MAX)
    split: str = "train"
    image_only: bool = False


class EpisodeStart(_Wire):
    episode_id: str
    messages: Messages = Field(description="the first prompt")
    expert_action: str | None = Field(
        default=None,
        description="the expert's action at ``messages`` (the first observation): what an "
        "expert policy plays next; None when the task has no expert",
    )
    info: dict[str, Any] = {}


class StepRequest(_Wire):
    """Exactly one of ``completion`` (a model's text, parsed by the task) or ``action``."""

    completion: str | None = None
    action: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StepRequest:
        if (self.completion is None) == (self.action is None):
            raise ValueError("give exactly one of completion or action")
        return self


class StepInfo(_Wire):
    valid_action: bool = Field(description="the completion parsed to an action")
    action: str | None = Field(description="the action taken (None: invalid completion)")
    achievements: list[str] = Field(default=[], description="unlocked at this step")
    expert_action: str | None = Field(
        default=None,
        description="the expert's action at the observation this step acted on (the prompt "
        "the completion answered, not the next one): the DAgger relabel of this step",
    )
    extra: dict[str, Any] = {}


class StepResult(_Wire):
    reward: float
    done: bool = Field(description="the episode ended (terminal or truncated)")
    truncated: bool = False
    info: StepInfo
    messages: Messages | None = Field(default=None, description="the next prompt; None once done")
    next_expert_action: str | None = Field(
        default=None,
        description="the expert's action at ``messages`` (the next observation): what an "
        "expert policy plays next; None once done or when the task has no expert",
    )


class StepOutcome(BaseModel):
    """What ``Task.step`` returns; the episode layer adds parsing and truncation."""

    reward: float
    done: bool
    achievements: list[str] = []
    extra: dict[str, Any] = {}


class Task(Protocol):
    """One episode of an environment. No base class: any class with these members is a task."""

    info: ClassVar[TaskInfo]

    def reset(self, seed: int, split: str) -> None:
        """Start the episode. The same (seed, split) gives the same episode."""

    def prompt(self, image_only: bool) -> Messages:
        """The current observation as chat messages (system, then user with the frame)."""

    def parse(self, completion: str) -> str | None:
        """The action a model's completion names, or None when it names none."""

    def step(self, action: str) -> StepOutcome:
        """Apply one of ``info.actions``."""

    def expert(self) -> str | None:
        """The expert's action at the current observation (None: the task has no expert).

        The episode layer calls it exactly once per observation, after ``reset`` and after
        each ``step`` that does not end the episode, so an expert may keep memory."""


class TaskError(Exception):
    """What both clients raise for a refused call: ``status`` is the HTTP status the same
    call earns over the wire (400 bad request, 404 unknown episode, 401 missing key; 0 when
    the app could not be reached) and ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"task app error {status}: {message}" if status else message)
        self.status = status
        self.message = message


class TaskClient(Protocol):
    """How a collector reaches a task: in-process or over HTTP, the same calls."""

    def info(self) -> TaskInfo: ...

    def start(self, request: EpisodeRequest) -> EpisodeStart: ...

    def step(self, episode_id: str, request: StepRequest) -> StepResult: ...

    def close(self, episode_id: str) -> None: ...
