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

import json
import time
from pathlib import Path
from typing import Any

from vlmtune.config import JobFile, dump_toml
from vlmtune.data import load_dataset
from vlmtune.engine.distributed import env_info
from vlmtune.engine.prefetch import prefetch_images
from vlmtune.evaluation import evaluate_exact_match
from vlmtune.recipes.common import (
    CHECKPOINT_PREFIX,
    MetricsLog,
    ProgressBar,
    batch_indices,
    create_training_client,
    is_main_process,
    latest_checkpoint,
    learning_rate_at,
    main_process_log,
    steps_per_epoch,
)
from vlmtune.render import build_sft_datums
from vlmtune.sdk import (
    AdamParams,
    TrainingClient,
    scale_weights,
    weighted_token_count,
)
from vlmtune.types import Datum


def validation_loss(tc: TrainingClient, datums: list[Datum]) -> float:
    """Mean NLL per weighted token over ``datums`` (no gradients)."""
    n_tokens = weighted_token_count(datums)
    out = tc.forward(scale_weights(datums, 1.0 / max(1, n_tokens))).result()
    return out.metrics["loss:sum"]


def run(job: JobFile, run_dir: Path, *, resume: bool = False, log: Any = print) -> dict[str, Any]:
    hp = job.hyperparameters
    # Under torchrun every rank runs this loop on the same global batches (the engine
    # splits each batch over the ranks); only rank 0 logs and writes files.
    main = is_main_process()
    log = main_process_log(log)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / "config.toml").write_text(dump_toml(job))

    # -- data: the same loader `vlmtune data validate` uses --------------------------
    cap = job.model.max_images_per_message
    train_rows, train_report = load_dataset(
        job.job.data, "sft", max_images_per_message=cap, image_root=job.job.image_root
    )
    log(train_report.summary_text())
    val_rows, val_report = [], None
    if job.job.validation_data:
        val_rows, val_report = load_dataset(
            job.job.validation_data,
            "sft",
            max_images_per_message=cap,
            image_root=job.job.image_root,
        )

    tc = create_training_client(job, run_dir)
    log(tc.engine.describe())
    datums, render_report = build_sft_datums(
        train_rows, tc.renderer, sequence_length=hp.sequence_length, train_on=hp.train_on
    )
    val_datums, _ = build_sft_datums(
        val_rows, tc.renderer, sequence_length=hp.sequence_length, train_on=hp.train_on
    )
    # Decode and preprocess every image once, up front (worker processes when they pay),
    # so the loop never decodes; under torchrun each rank does it in-process.
    workers = 0 if env_info().enabled else job.training.image_workers
    log(prefetch_images([*datums, *val_datums], tc.engine.image_preprocessor, workers).summary())
    report = {"train": {**train_report.to_dict(), "render": render_report.to_dict()}}
    if val_report is not None:
        report["validation"] = val_report.to_dict()
    if main:
        (run_dir / "validation_report.json").write_text(json.dumps(report, indent=2))
    log(render_report.summary())
    if not datums:
        raise RuntimeError(
            f"{job.job.data}: no trainable examples left after validation and rendering"
        )

    # -- schedule -------------------------------------------------------------------
    batch_size = hp.per_device_batch * hp.gradient_accumulation_steps
    total_steps = hp.n_epochs * steps_per_epoch(len(datums), batch_size)
    if hp.max_steps is not None:
        total_steps = min(total_steps, hp.max_steps)

    start_step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            log(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; starting from step 0")
        else:
            start_step = int(tc.load_state(str(ckpt)).result()["step"])
            log(f"resumed from {ckpt} (step {start_step})")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resume else None)
    log(f"training {len(datums)} examples, {total_steps} steps of {batch_size} examples")

    def evaluate(step: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step, "eval/loss": validation_loss(tc, val_datums)}
        sampler = tc.create_sampling_client()
        result = evaluate_exact_match(
            sampler, val_rows[: hp.eval_max_examples], max_new_tokens=hp.eval_max_new_tokens
        )
        record.update({"eval/accuracy": result.accuracy, "eval/n": result.n})
        metrics.write(record)
        log(
            f"eval @ step {step}: loss {record['eval/loss']:.4f}  accuracy {result.accuracy:.3f} (n={result.n})"
        )
        return record

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
            opt_future = tc.optim_step(
                AdamParams(
                    learning_rate=lr,
                    beta1=hp.adam_beta1,
                    beta2=hp.adam_beta2,
                    eps=hp.adam_eps,
                    weight_decay=hp.weight_decay,
                    grad_clip_norm=hp.max_grad_norm,
                )
            )
            fb, opt = fb_future.result(), opt_future.result()
            elapsed = time.perf_counter() - t0
            last_loss = fb.metrics["loss:sum"]
            packing_effs.append(fb.metrics.get("packing_efficiency", 1.0))
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
                        {"packing_efficiency": fb.metrics["packing_efficiency"]}
                        if hp.packing
                        else {}
                    ),
                }
            )
            bar.update(step + 1, last_loss, len(batch) / elapsed)
            if hp.save_every and (step + 1) % hp.save_every == 0 and step + 1 < total_steps:
                tc.save_state(f"{CHECKPOINT_PREFIX}{step + 1}", extra={"step": step + 1}).result()
            if (
                hp.eval_every
                and val_datums
                and (step + 1) % hp.eval_every == 0
                and step + 1 < total_steps
            ):
                evaluate(step + 1)

    # -- the servable model -------------------------------------------------------------
    final_dir = Path(tc.save_weights_for_sampler(str(run_dir / "final")).result().path)
    summary: dict[str, Any] = {
        "steps": total_steps,
        "examples": len(datums),
        "final_loss": last_loss,
        "packing_efficiency": sum(packing_effs) / max(1, len(packing_effs)),
        "final_dir": str(final_dir),
    }
    if val_datums:
        summary.update(evaluate(total_steps))
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"saved {final_dir}")
    return summary
