"""Supervised fine-tuning: one loop over a ``TrainingClient``, top to bottom.

    rows --render--> datums --(per step: forward_backward, optim_step)--> checkpoints
                                                 \\-> eval on validation_data -> final/

The loss of a step is the mean negative log-likelihood over *all* weighted tokens of
the step (every micro-batch of the accumulation): each datum's weights are divided
by the step's weighted-token count before ``forward_backward``, so the summed loss
the engine returns is already that mean and gradients do not depend on how the step
is split into micro-batches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vlmtune.config import JobFile
from vlmtune.engine.distributed import env_info
from vlmtune.engine.divergence import check_finite
from vlmtune.evaluation import evaluate_exact_match
from vlmtune.recipes.common import (
    Checkpointer,
    LogFn,
    adam_params,
    batch_indices,
    create_training_client,
    learning_rate_at,
    load_job_data,
    main_process_log,
    prepare,
    report_data,
    resume_start_step,
    stop_on_divergence,
    total_steps_for,
)
from vlmtune.recipes.eval_records import write_eval_predictions
from vlmtune.recipes.preflight import check_rows_fit
from vlmtune.recipes.progress import ProgressBar, sft_fields
from vlmtune.render import datum_from_rendered
from vlmtune.render_rows import RenderLimits, render_rows
from vlmtune.sdk import (
    ServiceClientProtocol,
    TrainingClientProtocol,
    scale_weights,
    weighted_token_count,
)
from vlmtune.types import Datum


def validation_loss(tc: TrainingClientProtocol, datums: list[Datum]) -> float:
    """Mean NLL per weighted token over ``datums`` (no gradients)."""
    n_tokens = weighted_token_count(datums)
    out = tc.forward(scale_weights(datums, 1.0 / max(1, n_tokens))).result()
    return out.metrics["loss:sum"]


def run(
    job: JobFile,
    run_dir: Path,
    *,
    resume: bool = False,
    log: LogFn = print,
    service: ServiceClientProtocol | None = None,
) -> dict[str, Any]:
    """``service``: where the engine runs (``connect(url)`` for a server; default: here)."""
    hp = job.hyperparameters
    # Under torchrun every rank runs this loop on the same global batches (the engine
    # splits each batch over the ranks); only rank 0 logs and writes files.
    log = main_process_log(log)
    run = prepare(job, "sft", run_dir, log, service, resume=resume)

    # -- data: the same loader and checks as `vlmtune data validate --config` ----------
    train_rows, train_report, val_rows, val_report = load_job_data(job, "sft")
    check_rows_fit(job, "sft", train_rows)  # before the model loads

    tc = create_training_client(job, run.path, service)
    log(tc.describe())
    # Rows that cannot be trained on (too long, control tokens, ...) move to the reports.
    limits, image_token_id = RenderLimits.for_job(job), tc.renderer.image_token_id
    train = render_rows(train_rows, tc.renderer, limits, train_report)
    val = render_rows(val_rows, tc.renderer, limits, val_report) if val_report else []
    datums = [datum_from_rendered(r.sides[0], image_token_id) for r in train]
    val_datums = [datum_from_rendered(r.sides[0], image_token_id) for r in val]
    val_rows = [r.row for r in val]  # evaluation renders them again: only renderable ones
    # Decode and preprocess every image once, up front (worker processes when they pay),
    # so the loop never decodes; under torchrun each rank does it in-process.
    workers = 0 if env_info().enabled else job.training.image_workers
    log(tc.prefetch_images([*datums, *val_datums], workers))
    report_data(run, job, train_report, val_report, len(datums), "examples", log)

    # -- schedule -------------------------------------------------------------------
    batch_size = hp.per_device_batch * hp.gradient_accumulation_steps
    total_steps = total_steps_for(len(datums), batch_size, hp)
    start_step = resume_start_step(tc, run, resume, log)
    metrics = run.metrics(start_step if resume else None, total_steps)
    log(f"training {len(datums)} examples, {total_steps} steps of {batch_size} examples")

    def evaluate(step: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step, "eval/loss": validation_loss(tc, val_datums)}
        sampler = tc.create_sampling_client()
        eval_rows = val_rows[: hp.eval_max_examples]
        result = evaluate_exact_match(sampler, eval_rows, max_new_tokens=hp.eval_max_new_tokens)
        write_eval_predictions(run, step, eval_rows, result)  # evals/step-N.jsonl
        record.update({"eval/accuracy": result.accuracy, "eval/n": result.n})
        metrics.write(record)
        log(
            f"eval @ step {step}: loss {record['eval/loss']:.4f}  accuracy {result.accuracy:.3f} (n={result.n})"
        )
        return record

    every = Checkpointer(
        tc, run, total_steps, hp.save_every, hp.eval_every, evaluate if val_datums else None, log
    )

    # -- the loop -------------------------------------------------------------------
    last_loss = float("nan")
    packing_effs: list[float] = []
    with ProgressBar(total_steps, start_step, "sft") as bar:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            batch = [datums[i] for i in batch_indices(step, len(datums), batch_size, hp.seed)]
            n_tokens = weighted_token_count(batch)
            lr = learning_rate_at(
                step, total_steps, hp.learning_rate, hp.warmup_ratio, hp.lr_scheduler
            )
            fb_future = tc.forward_backward(scale_weights(batch, 1.0 / n_tokens))
            opt_future = tc.optim_step(adam_params(hp, lr))
            with stop_on_divergence(run.path, step + 1, lr):
                fb, opt = fb_future.result(), opt_future.result()
                check_finite(loss=fb.metrics["loss:sum"], grad_norm=opt.metrics["grad_norm"])
            elapsed = time.perf_counter() - t0
            last_loss = fb.metrics["loss:sum"]
            packing_effs.append(fb.metrics.get("packing_efficiency:mean", 1.0))
            n_positions = sum(d.model_input.length for d in batch)
            metrics.write(
                {
                    "step": step + 1,
                    "loss": last_loss,
                    "learning_rate": lr,
                    "grad_norm": opt.metrics["grad_norm"],
                    "weighted_tokens": n_tokens,
                    "tokens_per_s": n_positions / elapsed,
                    "examples_per_s": len(batch) / elapsed,
                    **(
                        {"packing_efficiency": fb.metrics["packing_efficiency:mean"]}
                        if hp.packing
                        else {}
                    ),
                }
            )
            bar.update(step + 1, sft_fields(last_loss, len(batch), n_positions, elapsed))
            every.after_step(step + 1)  # checkpoint, eval

    # -- the servable model, its eval, summary.json -----------------------------------
    return every.finish(
        {
            "steps": total_steps,
            "examples": len(datums),
            "final_loss": last_loss,
            "packing_efficiency": sum(packing_effs) / max(1, len(packing_effs)),
        }
    )
