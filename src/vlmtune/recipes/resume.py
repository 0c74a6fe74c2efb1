"""Where a run continues from, and what an interrupted run left behind.

    checkpoints/step-N/         resumable state (``engine/checkpoint.py``)
    checkpoints/step-N.remote   the tinker:// path of a state a server keeps

``--resume`` takes the newest checkpoint that is whole (``checkpoint_problem``: the
newer ones that are not are named and skipped), and only if it was saved under the
settings the job has now (``STATE_FIELDS``), both decided before the model loads. A
kill leaves hidden temporaries beside the files being written; the next start removes
them (``clean_run_dir``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.atomic import clean_leftovers, explain_refused_writes
from vlmtune.recipes.run_dir import ResumeError, RunDir
from vlmtune.sdk import TrainingClientProtocol

CHECKPOINT_PREFIX = "step-"
# checkpoints/step-N.remote: the tinker:// path of a state a server keeps for this run
REMOTE_SUFFIX = ".remote"
CHECKPOINTS_DIR = "checkpoints"

# The TOML key behind each engine setting a checkpoint depends on (``STATE_FIELDS``),
# so that a refused resume names what to change back.
_TOML_KEYS = {
    "base_model": "job.model",
    "mode": "algorithm.variety",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "target_modules": "lora.target_modules",
    "freeze_vision_tower": "model.freeze_vision_tower",
    "freeze_projector": "model.freeze_projector",
    "freeze_embeddings": "model.freeze_embeddings",
}
_VARIETY_OF_MODE = {"full": "fft"}  # the engine's "full" is the job file's "fft"

Log = Callable[[str], object]


@dataclass(frozen=True)
class SavedState:
    """One checkpoint of a run: its step, where ``load_state`` finds it, and why it
    cannot be resumed from (None: it can)."""

    step: int
    where: str  # a folder, or the tinker:// path a .remote file holds
    problem: str | None = None


def saved_states(run_dir: Path) -> list[SavedState]:
    """The run's checkpoints, newest first, each checked (cheaply) for being whole."""
    from vlmtune.engine.checkpoint import checkpoint_problem

    found: dict[int, SavedState] = {}
    for p in (run_dir / CHECKPOINTS_DIR).glob(f"{CHECKPOINT_PREFIX}*"):
        step = p.name[len(CHECKPOINT_PREFIX) :].removesuffix(REMOTE_SUFFIX)
        if not step.isdigit():
            continue
        if p.is_dir():
            found[int(step)] = SavedState(int(step), str(p), checkpoint_problem(p))
        elif p.is_file() and p.name.endswith(REMOTE_SUFFIX):
            found[int(step)] = _remote_state(int(step), p)
    return [found[step] for step in sorted(found, reverse=True)]


def _remote_state(step: int, pointer: Path) -> SavedState:
    try:
        where = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return SavedState(step, str(pointer), f"unreadable ({e})")
    if "://" not in where:
        return SavedState(step, str(pointer), f"holds {where[:80]!r}, not a tinker:// path")
    return SavedState(step, where)


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest whole resumable state, as ``load_state`` takes it: the folder
    ``checkpoints/step-N/``, or the server path a ``step-N.remote`` file holds."""
    return next((s.where for s in saved_states(run_dir) if s.problem is None), None)


def shown(where: str, run_dir: Path) -> str:
    """``where`` relative to the run directory when inside it (shorter to read)."""
    path = Path(where)
    if "://" not in where and path.is_relative_to(run_dir):
        return str(path.relative_to(run_dir))
    return where


def choose_checkpoint(run_dir: Path, engine_now: dict[str, Any] | None, log: Log) -> str | None:
    """What ``--resume`` loads: the newest whole checkpoint (each newer one that is not
    is logged with the reason), or None when the run has none. Raises ``ResumeError``
    when checkpoints exist but none is whole, or when the chosen one was saved under
    other ``engine_now`` settings (``asdict(EngineConfig)``; None: not compared)."""
    states = saved_states(run_dir)
    chosen = next((s for s in states if s.problem is None), None)
    if states and chosen is None:
        raise ResumeError(
            f"{run_dir}: --resume: no checkpoint can be resumed from:\n"
            + "".join(f"  {shown(s.where, run_dir)}: {s.problem}\n" for s in states)
            + f"move {run_dir / CHECKPOINTS_DIR} aside (or train without --resume) to start "
            "again from step 0"
        )
    for s in states:
        if s is chosen:
            break
        log(f"--resume: skipped {shown(s.where, run_dir)}: {s.problem}")
    if chosen is not None and engine_now is not None and "://" not in chosen.where:
        _check_same_settings(Path(chosen.where), engine_now, run_dir)
    return None if chosen is None else chosen.where


def _check_same_settings(ckpt: Path, engine_now: dict[str, Any], run_dir: Path) -> None:
    from vlmtune.engine.checkpoint import read_meta, state_differences

    saved = read_meta(ckpt).get("engine")
    if not isinstance(saved, dict):  # saved before the engine config was recorded
        return
    changes = [
        f"  {_TOML_KEYS.get(key, key)}: {_toml_value(key, old)} -> {_toml_value(key, new)}"
        for key, old, new in state_differences(saved, engine_now)
    ]
    if changes:
        raise ResumeError(
            f"--resume: {shown(str(ckpt), run_dir)} was saved under other settings, and its "
            "weights only fit those (saved -> now):\n"
            + "\n".join(changes)
            + "\nset them back to resume, or train without --resume (or with another "
            "--output) to start a new run"
        )


def _toml_value(key: str, value: Any) -> str:
    if key == "mode" and isinstance(value, str):
        value = _VARIETY_OF_MODE.get(value, value)
    return json.dumps(value)


def save_checkpoint(tc: TrainingClientProtocol, run: RunDir, step: int) -> str:
    """Resumable state after ``step`` steps, named ``step-N``: in-process it is the
    folder ``checkpoints/step-N/``; a server keeps it and answers with its path, which
    goes in ``checkpoints/step-N.remote`` so that ``--resume`` finds it.

    Ctrl-C while it is written lets it finish (the client's worker writes it either
    way), so the message on the way out names it; a second Ctrl-C leaves at once."""
    name = f"{CHECKPOINT_PREFIX}{step}"
    with explain_refused_writes(run.path / "checkpoints" / name, f"the checkpoint of step {step}"):
        future = tc.save_state(name, extra={"step": step})
        try:
            where = future.result()
        except KeyboardInterrupt:
            _record_remote(run, name, future.result())
            raise
    _record_remote(run, name, where)
    return where


def _record_remote(run: RunDir, name: str, where: str) -> None:
    if "://" in where:
        run.write_text(f"checkpoints/{name}{REMOTE_SUFFIX}", where + "\n")


def last_good_checkpoint(run_dir: Path) -> str:
    """Where a stopped run can continue from, as its message says it."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return "no checkpoint was saved (hyperparameters.save_every keeps some)"
    return (
        f"the last good (finite) checkpoint is {shown(ckpt, run_dir)} (--resume continues from it)"
    )


def resume_start_step(
    tc: TrainingClientProtocol, run: RunDir | Path, resume: bool, log: Log = print
) -> int:
    """The step to start from: 0, or the step of the checkpoint ``prepare`` chose (the
    newest whole one; its state is loaded into ``tc``)."""
    if not resume:
        return 0
    if isinstance(run, RunDir):
        run_dir, ckpt = run.path, run.resume_from
    else:  # a caller that skipped prepare
        run_dir, ckpt = run, choose_checkpoint(run, None, log)
    ckpt = _rank0s(ckpt)  # every rank loads the same one
    if ckpt is None:
        log(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; starting from step 0")
        return 0
    try:
        step = int(tc.load_state(str(ckpt)).result()["step"])
    except Exception as e:  # it looked whole; its bytes were not (or the server refused it)
        raise ResumeError(
            f"--resume: {ckpt} could not be loaded: {e} (move it aside to resume from the "
            "checkpoint before it)"
        ) from e
    log(f"resumed from {ckpt} (step {step})")
    return step


def _rank0s(value: str | None) -> str | None:
    """Rank 0's ``value`` under torchrun (rank 0 alone cleaned the run directory, so a
    rank that looked at it meanwhile may have seen it half cleaned)."""
    import torch.distributed as dist

    from vlmtune.engine.distributed import broadcast_from_main

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return broadcast_from_main(value)
    return value


def clean_run_dir(run_dir: Path, log: Log) -> None:
    """Remove the temporaries that writes killed midway left in the run directory and
    its ``checkpoints/`` (``atomic.clean_leftovers``), in one line. Main process only:
    the others must not race it."""
    done = [*clean_leftovers(run_dir), *clean_leftovers(run_dir / CHECKPOINTS_DIR)]
    if done:
        shown_done = [d.replace(f"{run_dir}/", "") for d in done]
        log(f"an interrupted write left temporaries in {run_dir}: " + "; ".join(shown_done))
