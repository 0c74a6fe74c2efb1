"""How `vlmtune train` says it stopped before the end: Ctrl-C, with what was saved and
the command that continues; every other stop is one message and an exit code.

    0    finished
    1    training stopped: a diverging run, or a disk that refused a write
    2    the job, its data or its run directory need a fix (--resume included)
    130  Ctrl-C (128 + SIGINT, as a shell reports it)
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

EXIT_INTERRUPTED = 130


def resume_command(argv: Sequence[str]) -> str:
    """The command line ``argv`` (``sys.argv``) with ``--resume`` added after ``train``,
    where a trailing ``--`` cannot swallow it; unchanged when it already has it."""
    args = list(argv[1:])
    if "--resume" not in args:
        at = args.index("train") + 1 if "train" in args else len(args)
        args.insert(at, "--resume")
    return shlex.join(["vlmtune", *args])


def interrupted_message(run_dir: Path, argv: Sequence[str]) -> str:
    """What Ctrl-C left: the newest whole checkpoint (or nothing), and how to go on."""
    from vlmtune.recipes.resume import saved_states

    saved = next((s for s in saved_states(run_dir) if s.problem is None), None)
    if saved is None:
        state = f"nothing saved yet (no checkpoint in {run_dir / 'checkpoints'})"
    else:
        state = f"the last checkpoint is {saved.where} (step {saved.step})"
    return f"interrupted: {state}\nto resume: {resume_command(argv)}"


# How a `vlmtune train` that stopped says why (its last words; see `train`).
STOPPED_PREFIX = "training stopped: "


def job_failure_text(error: str | None) -> str:
    """A failed server job's error (its worker's last stderr lines) cut to the reason:
    the worker's own "training stopped: ..." line when it has one (a diverged run says
    the step and likely cause there, as a local run does), else every line."""
    lines = (error or "").splitlines()
    stopped = [line for line in lines if line.startswith(STOPPED_PREFIX)]
    return stopped[-1] if stopped else "\n".join(lines)
