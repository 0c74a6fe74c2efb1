"""Task names -> task classes, imported only when asked for (Crafter is an optional extra)."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from vlmtune.protocol.errors import BadRequest, shown
from vlmtune.tasks.protocol import Task


@dataclass(frozen=True)
class TaskEntry:
    module: str  # where the class lives
    cls: str
    needs: str | None = None  # a package the task imports (None: always available)
    extra: str | None = None  # the vlmtune extra that installs it


TASKS: dict[str, TaskEntry] = {
    "lamp": TaskEntry("vlmtune.tasks.lamp", "LampTask"),
    "crafter": TaskEntry("vlmtune.tasks.crafter_task", "CrafterTask", "crafter", "crafter"),
}


class UnknownTask(BadRequest):
    """A task name that is not registered, or whose optional package is missing."""


def task_names() -> list[str]:
    return sorted(TASKS)


def installed(name: str) -> bool:
    """Whether the task's optional package (if any) is importable."""
    needs = TASKS[name].needs
    return needs is None or importlib.util.find_spec(needs) is not None


def task_class(name: str) -> type[Task]:
    """The class registered as ``name``; ``UnknownTask`` names the known tasks, or the
    extra to install."""
    entry = TASKS.get(name)
    if entry is None:
        raise UnknownTask(f"unknown task {shown(name)} (known: {', '.join(task_names())})")
    if not installed(name):
        raise UnknownTask(
            f"task {name!r} needs the {entry.needs} package: pip install 'vlmtune[{entry.extra}]'"
        )
    cls: type[Task] = getattr(importlib.import_module(entry.module), entry.cls)
    return cls
