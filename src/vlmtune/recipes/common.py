"""What every recipe shares besides its algorithm: setup (vision defaults, the run
directory), data loading and its report, the schedule, data order, checkpoints and
evals, logging. Each loop stays in its own module, readable top to bottom."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from vlmtune.atomic import explain_refused_writes
from vlmtune.config import ConfigError, HyperparametersConfig, JobFile
from vlmtune.data import load_dataset
from vlmtune.data.report import ValidationReport
from vlmtune.defaults import apply_vision_defaults, image_cap, resolved_lines
from vlmtune.engine.distributed import is_main_process
from vlmtune.engine.divergence import DivergedError
from vlmtune.engine.engine import EngineConfig
from vlmtune.recipes.eval_records import write_applied_settings
from vlmtune.recipes.resume import (
    choose_checkpoint,
    clean_run_dir,
    last_good_checkpoint,
    latest_checkpoint,  # noqa: F401 - imported from here by callers
    resume_start_step,  # noqa: F401 - imported from here by the recipes
    save_checkpoint,
)
from vlmtune.recipes.run_dir import REPORT_FILE, RunDir
from vlmtune.render_rows import METHOD_KIND, RenderedRow
from vlmtune.sdk import ServiceClient, ServiceClientProtocol, TrainingClientProtocol, connect
from vlmtune.sdk.http import RemoteError
from vlmtune.settings import SettingChange
from vlmtune.types import AdamParams

# Where a recipe's lines go: ``print``, or rank 0's ``vlmtune train`` reporter.
LogFn = Callable[[str], object]
RowT = TypeVar("RowT")


def main_process_log(log: LogFn) -> LogFn:
    """``log`` on rank 0; a no-op elsewhere (N ranks would print every line N times)."""
    return log if is_main_process() else (lambda *args, **kwargs: None)


def learning_rate_at(
    step: int, total_steps: int, peak: float, warmup_ratio: float, scheduler: str
) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then linear/cosine/constant.

    Warmup ramps ``peak * (step + 1) / warmup_steps`` so step 0 already moves.
    """
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if scheduler == "constant" or total_steps <= warmup_steps:
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def batch_indices(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a fixed function of (step, seed).

    Each epoch is a fresh seeded permutation; the last batch of an epoch may be short.
    Being a pure function of the step is what makes ``--resume`` replay the same order.
    """
    spe = steps_per_epoch(n_examples, batch_size)
    epoch, within = divmod(step, spe)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[within * batch_size : (within + 1) * batch_size]


@contextmanager
def stop_on_divergence(
    run_dir: Path, step: int, learning_rate: float | None = None
) -> Iterator[None]:
    """Optimizer step ``step`` (1-based) runs inside: a ``DivergedError`` raised there
    (the engine refused a non-finite gradient norm, or ``check_finite`` a loss) comes
    out as one naming the step, the likely cause and the last good checkpoint. The
    loop ends there, so ``Checkpointer.finish`` never writes ``final/``. The same
    refusal by a server's engine (a ``RemoteError``) comes out the same way."""
    try:
        yield
    except (DivergedError, RemoteError) as e:
        what = remote_divergence(e) if isinstance(e, RemoteError) else str(e)
        if what is None:
            raise
        lr = "" if learning_rate is None else f" ({learning_rate:.3g})"
        raise DivergedError(
            f"step {step}: {what} — the learning rate{lr} is likely too high, or the data "
            "has an example whose loss overflows (lower hyperparameters.learning_rate, "
            "or set hyperparameters.max_grad_norm); "
            f"final/ was not written; {last_good_checkpoint(run_dir)}"
        ) from None


def remote_divergence(e: RemoteError) -> str | None:
    """What a server's engine refused, when ``e`` is its ``DivergedError`` (the server
    sends an unexpected exception as "<type name>: <message>"); None otherwise."""
    _, found, what = e.message.partition(f"{DivergedError.__name__}: ")
    return what if found else None


def save_final(tc: TrainingClientProtocol, run: RunDir) -> str:
    """The servable model: ``run_dir/final/`` in-process; on a server, its
    ``tinker://<run>/sampler_weights/final`` path (served there: sample from it, or
    promote it), which the summary records in place of a folder."""
    return tc.save_weights_for_sampler(str(run.path / "final")).result().path


def adam_params(hp: HyperparametersConfig, learning_rate: float) -> AdamParams:
    """The optimizer settings of ``[hyperparameters]`` at this step's learning rate."""
    return AdamParams(
        learning_rate=learning_rate,
        beta1=hp.adam_beta1,
        beta2=hp.adam_beta2,
        eps=hp.adam_eps,
        weight_decay=hp.weight_decay,
        grad_clip_norm=hp.max_grad_norm,
    )


def create_training_client(
    job: JobFile, run_dir: Path, service: ServiceClientProtocol | None = None
) -> TrainingClientProtocol:
    """The job's engine (``EngineConfig.from_job``) behind a training client: in this
    process (``service`` None), or on the server ``service = connect(url)`` reaches,
    configured identically. In-process, checkpoints go under ``run_dir/checkpoints``."""
    service = service if service is not None else connect()
    return service.create_training_client_from_config(
        EngineConfig.from_job(job), run_dir / "checkpoints"
    )


# -- setup ---------------------------------------------------------------------------


def prepare(
    job: JobFile,
    method: str,
    run_dir: Path,
    log: LogFn = print,
    service: ServiceClientProtocol | None = None,
    resume: bool = False,
) -> RunDir:
    """What every recipe does first, whoever calls it (``vlmtune train`` or Python):
    log what the job file resolved, apply and log the vision defaults, remove what a
    killed write left in the run directory, choose the checkpoint ``resume`` continues
    from (``ResumeError`` when none is whole or its settings differ: before the model
    loads), write ``config.toml`` (the job as it will run) and start the job's
    trackers (``ConfigError`` for one that cannot start).

    Applying the defaults again changes nothing (``apply_vision_defaults`` leaves a
    job it has set up as it is), so a job may go through this more than once.
    """
    for line in resolved_lines(job):
        log(line)
    vision = vision_defaults(job, method, service)
    for change in vision:
        log(f"vision default: {change}")
    log(f"run directory: {run_dir}")
    run = RunDir(run_dir, log=log)
    if run.main:
        clean_run_dir(run.path, log)
    if resume:
        run.resume_from = choose_checkpoint(run.path, asdict(EngineConfig.from_job(job)), log)
    run.write_config(job)
    write_applied_settings(run, job, method, vision)  # for the run's report
    # [logging] report_to: before the model loads, so one that cannot start costs nothing
    run.start_trackers(job)
    return run


def vision_defaults(
    job: JobFile, method: str, service: ServiceClientProtocol | None = None
) -> list[SettingChange]:
    """Apply ``apply_vision_defaults`` for the device the engine runs on. In this
    process that is this machine's; a server's device is unknown here, so precision
    stays as set ("auto": the engine there resolves it, as ``EngineConfig.from_job``
    says)."""
    import torch

    from vlmtune.models.registry import get_model_spec

    try:
        supports_vision = get_model_spec(job.job.model).supports_vision
    except (KeyError, ValueError):
        supports_vision = True  # e.g. an adapter directory: Qwen3-VL, the only family
    device_type: str | None = None
    bf16_ok = False
    if service is None or isinstance(service, ServiceClient):
        on_gpu = job.training.device != "cpu" and torch.cuda.is_available()
        device_type = "cuda" if on_gpu else "cpu"
        bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    return apply_vision_defaults(
        job,
        supports_vision=supports_vision,
        device_type=device_type,
        bf16_ok=bf16_ok,
        method=method,
    )


# -- data ----------------------------------------------------------------------------


def load_job_data(
    job: JobFile, method: str
) -> tuple[list[Any], ValidationReport, list[Any], ValidationReport | None]:
    """(train rows, their report, validation rows, their report or None): the loader and
    checks of ``vlmtune data validate --config``, with the model family's image cap."""
    kind = METHOD_KIND[method]
    cap = image_cap(job.job.model, job.model.max_images_per_message)
    rows, report = load_dataset(
        job.job.data, kind, max_images_per_message=cap, image_root=job.job.image_root
    )
    if not job.job.validation_data:
        return rows, report, [], None
    val_rows, val_report = load_dataset(
        job.job.validation_data, kind, max_images_per_message=cap, image_root=job.job.image_root
    )
    return rows, report, val_rows, val_report


def rows_of(rendered: Iterable[RenderedRow], kind: type[RowT]) -> list[RowT]:
    """The rows behind ``rendered``, each a ``kind`` (the loader read only that kind)."""
    rows: list[RowT] = []
    for r in rendered:
        if not isinstance(r.row, kind):
            raise TypeError(f"line {r.row.line}: a {type(r.row).__name__}, not a {kind.__name__}")
        rows.append(r.row)
    return rows


def report_data(
    run: RunDir,
    job: JobFile,
    train: ValidationReport,
    validation: ValidationReport | None,
    n_trainable: int,
    what: str,
    log: LogFn = print,
) -> None:
    """Every recipe's account of its data, once rendering has moved the rows it cannot
    train on into the reports: ``validation_report.json`` and each report's summary in
    the log. No trainable ``what`` (examples, pairs, prompts) left is a config error."""
    run.write_report(train, validation)
    log(train.summary_text())
    if validation is not None:
        log(validation.summary_text())
    if not n_trainable:
        raise ConfigError(
            "job file",
            [
                f"job.data: {job.job.data}: no trainable {what} left after validation and "
                f"rendering (why: {run.path / REPORT_FILE})"
            ],
        )


def total_steps_for(n_items: int, batch_size: int, hp: HyperparametersConfig) -> int:
    """Optimizer steps of the run: ``n_epochs`` passes of ``batch_size`` items a step,
    at most ``max_steps``."""
    total = hp.n_epochs * steps_per_epoch(n_items, batch_size)
    return total if hp.max_steps is None else min(total, hp.max_steps)


# -- checkpoints and evals -----------------------------------------------------------


class Checkpointer:
    """The checkpoint-and-eval step every loop takes after its optimizer step, and the
    end of the run (the servable model, a last eval, ``summary.json``).

    ``evaluate(step)`` logs and records an eval and returns its metrics; None when the
    job has no validation data.
    """

    def __init__(
        self,
        tc: TrainingClientProtocol,
        run: RunDir,
        total_steps: int,
        save_every: int | None,
        eval_every: int | None,
        evaluate: Callable[[int], dict[str, Any]] | None,
        log: LogFn = print,
    ) -> None:
        self.tc, self.run, self.total_steps = tc, run, total_steps
        self.save_every, self.eval_every = save_every, eval_every
        self.evaluate, self.log = evaluate, log

    def after_step(self, step: int) -> None:
        """``step`` optimizer steps are done: a checkpoint every ``save_every`` steps and
        an eval every ``eval_every``. Not after the last: ``finish`` saves and evaluates."""
        if step >= self.total_steps:
            return
        if self.save_every and step % self.save_every == 0:
            # said before, as the eval and the final save are: on a large model these
            # take minutes, during which the progress display stands still
            self.log(f"step {step}: saving a checkpoint ...")
            with stop_on_divergence(self.run.path, step):  # weights that overflowed
                save_checkpoint(self.tc, self.run, step)
        if self.evaluate is not None and self.eval_every and step % self.eval_every == 0:
            self.log(f"step {step}: evaluating ...")
            self.evaluate(step)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Save the servable model, evaluate it, write ``summary`` (plus ``final_dir``
        and the eval's metrics) as ``summary.json``; return it."""
        self.log("saving the final model ...")
        with explain_refused_writes(self.run.path / "final", "the final model"):
            final_dir = save_final(self.tc, self.run)
        summary = {**summary, "final_dir": final_dir}
        if self.evaluate is not None:
            self.log(f"step {self.total_steps}: evaluating the final model ...")
            summary.update(self.evaluate(self.total_steps))
        # this process's time (a resumed run's: since it resumed), for the run's report
        summary["wall_s"] = round(time.time() - self.run.started, 1)
        self.run.write_summary(summary)
        self.run.trackers.close()  # the trackers' runs end as finished
        self.log(f"saved {final_dir}")
        return summary
