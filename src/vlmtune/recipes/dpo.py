"""Direct Preference Optimization: one loop over a ``TrainingClient``, top to bottom.

    pairs --render--> (chosen, rejected) datums --forward (step 0)--> reference log-probs
          --(per step: forward_backward_custom(dpo loss), optim_step)--> checkpoints -> final/

Each side of a pair is rendered on its own with ``train_on="last_assistant"``, so the
weights mark exactly the final assistant turn (the response) and the shared prompt,
images included, is identical token for token. A response's log-probability is the
sum of its weighted tokens' log-probabilities (Rafailov et al. 2023, eq. 7).

The reference model is the policy before the first ``optim_step``: its log-probs for
every pair the run will use (the batch order is known in advance, plus the first
``eval_max_examples`` validation pairs) are computed once, up front, with ``forward`` on
the policy itself, and cached in ``reference_logps.json``. That is exact for full
fine-tuning and LoRA alike (a fresh adapter is a no-op) and needs no second copy of
the model and no reference pass per step. A resumed run reads the cache; without it,
``forward_reference`` recomputes it (adapter disabled, or a frozen copy for full FT).

To try another preference loss (IPO, hinge, ...), replace ``preference_loss``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlmtune.config import DPOConfig, JobFile
from vlmtune.data import PreferenceRow, SFTRow
from vlmtune.data.report import ValidationReport
from vlmtune.engine import losses
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
    rows_of,
    stop_on_divergence,
    total_steps_for,
)
from vlmtune.recipes.eval_records import write_eval_predictions
from vlmtune.recipes.preflight import check_rows_fit
from vlmtune.recipes.progress import ProgressBar, dpo_fields
from vlmtune.render import Renderer, datum_from_rendered
from vlmtune.render_rows import RenderLimits, render_rows
from vlmtune.sdk import ServiceClientProtocol, TrainingClientProtocol
from vlmtune.types import Datum

Pair = tuple[Datum, Datum]  # (chosen, rejected)
REFERENCE_FILE = "reference_logps.json"


def preference_loss(
    policy_chosen_P: torch.Tensor,
    policy_rejected_P: torch.Tensor,
    reference_chosen_P: torch.Tensor,
    reference_rejected_P: torch.Tensor,
    config: DPOConfig,
    tie_rtol: float = losses.TIE_RTOL["fp32"],
) -> losses.LossOutput:
    """The loss on summed response log-probs of P pairs. Replace this to change DPO."""
    return losses.dpo_loss(
        policy_chosen_P,
        policy_rejected_P,
        reference_chosen_P,
        reference_rejected_P,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        tie_rtol=tie_rtol,
    )


def response_logps(datums: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of each datum's log-probs over its weighted (response) positions: ``(N,)``."""
    sums = []
    for d, lp_T in zip(datums, logprobs, strict=True):
        mask_T = d.loss_fn_inputs["weights"].to_torch().to(lp_T.device) > 0
        sums.append((lp_T * mask_T).sum())
    return torch.stack(sums)


def make_loss_fn(
    reference_P_2: torch.Tensor, config: DPOConfig, tie_rtol: float = losses.TIE_RTOL["fp32"]
):
    """A ``forward_backward_custom`` loss for datums laid out chosen, rejected, chosen, ..."""

    def dpo_loss_fn(datums: list[Datum], logprobs: list[torch.Tensor]) -> losses.LossOutput:
        logps_N = response_logps(datums, logprobs)
        ref = reference_P_2.to(logps_N.device)
        return preference_loss(logps_N[0::2], logps_N[1::2], ref[:, 0], ref[:, 1], config, tie_rtol)

    return dpo_loss_fn


def render_pairs(
    rows: Sequence[PreferenceRow],
    renderer: Renderer,
    limits: RenderLimits,
    report: ValidationReport,
) -> tuple[list[Pair], list[PreferenceRow]]:
    """(pairs, their rows): a pair is dropped if either side is too long, has no
    response tokens, or cannot be rendered (never truncated), and moves from valid to
    dropped in ``report``. The checks are ``render_row``'s, as in SFT, RL and
    ``vlmtune data validate --config``."""
    rendered = render_rows(rows, renderer, limits, report)
    pairs = [
        (
            datum_from_rendered(r.sides[0], renderer.image_token_id),
            datum_from_rendered(r.sides[1], renderer.image_token_id),
        )
        for r in rendered
    ]
    return pairs, rows_of(rendered, PreferenceRow)


def pair_logps(tc: TrainingClientProtocol, pairs: Sequence[Pair], reference: bool) -> torch.Tensor:
    """``(P, 2)`` summed response log-probs under the policy (or the reference), no grad."""
    forward = tc.forward_reference if reference else tc.forward
    out = torch.zeros(len(pairs), 2)
    chunk = 32  # pairs per call: bounded request size over HTTP
    for start in range(0, len(pairs), chunk):
        datums = [d for pair in pairs[start : start + chunk] for d in pair]
        result = forward(datums).result()
        lps = [o["logprobs"].to_torch() for o in result.loss_fn_outputs]
        out[start : start + chunk] = response_logps(datums, lps).view(-1, 2)
    return out


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
    # Under torchrun every rank runs this loop; only rank 0 logs and writes files.
    log = main_process_log(log)
    run = prepare(job, "dpo", run_dir, log, service, resume=resume)

    # -- data: preference rows, prompts (images included) validated equal per pair ------
    train_rows, train_report, val_rows, val_report = load_job_data(job, "dpo")
    check_rows_fit(job, "dpo", train_rows)  # before the model loads

    tc = create_training_client(job, run.path, service)
    log(tc.describe())
    # The checks of `vlmtune data validate --config`: drops move into the reports.
    limits = RenderLimits.for_job(job)
    pairs, _ = render_pairs(train_rows, tc.renderer, limits, train_report)
    val_pairs: list[Pair] = []
    val_kept: list[PreferenceRow] = []
    if val_report is not None:
        val_pairs, val_kept = render_pairs(val_rows, tc.renderer, limits, val_report)
    report_data(run, job, train_report, val_report, len(pairs), "pairs", log)

    # -- schedule, resume and the reference log-probs -----------------------------------
    batch_size = hp.per_device_batch * hp.gradient_accumulation_steps  # pairs per step
    total_steps = total_steps_for(len(pairs), batch_size, hp)
    start_step = resume_start_step(tc, run, resume, log)
    metrics = run.metrics(start_step if resume else None, total_steps)

    # Reference values are needed only for the pairs this run trains on (the batch order
    # is a pure function of the step) and the validation pairs it evaluates.
    used = sorted(
        {i for s in range(total_steps) for i in batch_indices(s, len(pairs), batch_size, hp.seed)}
    )
    val_pairs, val_kept = val_pairs[: hp.eval_max_examples], val_kept[: hp.eval_max_examples]
    cache = run.path / REFERENCE_FILE
    if start_step > 0 and cache.exists():
        cached = json.loads(cache.read_text())
    else:
        # Before the first optim_step the policy *is* the reference: plain forward is exact.
        t0 = time.perf_counter()
        n = len(used) + len(val_pairs)
        log(f"reference log-probs of {n} pairs ...")  # before: a pass over every pair
        as_ref = start_step > 0  # resumed without a cache: the base model recomputes them
        train_P_2 = pair_logps(tc, [pairs[i] for i in used], reference=as_ref)
        cached = {
            "train": dict(zip(map(str, used), train_P_2.tolist(), strict=True)),
            "validation": pair_logps(tc, val_pairs, reference=as_ref).tolist(),
        }
        run.write_json(REFERENCE_FILE, cached, indent=None)
        log(f"reference log-probs of {n} pairs in {time.perf_counter() - t0:.1f}s")
    ref_P_2 = torch.full((len(pairs), 2), float("nan"))  # NaN: a pair this run never uses
    for i, value in cached["train"].items():
        ref_P_2[int(i)] = torch.tensor(value)
    val_ref_P_2 = torch.tensor(cached["validation"]).view(-1, 2)
    log(f"training {len(pairs)} pairs, {total_steps} steps of {batch_size} pairs")
    # how far apart float noise puts a margin that is really 0 (reward_accuracy's ties)
    # (the engine's dtype: precision "auto" resolves to bf16 on a GPU that has it)
    tie_rtol = losses.TIE_RTOL["bf16" if tc.get_info().get("dtype") == "bfloat16" else "fp32"]

    def evaluate(step: int) -> dict[str, Any]:
        """Held-out DPO metrics, and greedy exact match against the chosen answer."""
        policy_P_2 = pair_logps(tc, val_pairs, reference=False)
        _, m = preference_loss(
            policy_P_2[:, 0],
            policy_P_2[:, 1],
            val_ref_P_2[:, 0],
            val_ref_P_2[:, 1],
            job.dpo,
            tie_rtol,
        )
        record: dict[str, Any] = {"step": step, **{f"eval/{k}": v for k, v in m.items()}}
        sft_rows = [SFTRow(r.line, r.chosen, r.metadata) for r in val_kept]
        result = evaluate_exact_match(
            tc.create_sampling_client(), sft_rows, max_new_tokens=hp.eval_max_new_tokens
        )
        write_eval_predictions(run, step, sft_rows, result)  # evals/step-N.jsonl
        record.update({"eval/accuracy": result.accuracy, "eval/n": result.n})
        metrics.write(record)
        log(
            f"eval @ step {step}: dpo loss {m['dpo_loss']:.4f}  reward accuracy "
            f"{m['reward_accuracy']:.3f}  exact match {result.accuracy:.3f} (n={result.n})"
        )
        return record

    every = Checkpointer(
        tc, run, total_steps, hp.save_every, hp.eval_every, evaluate if val_pairs else None, log
    )

    # -- the loop -------------------------------------------------------------------
    last: dict[str, float] = {}
    with ProgressBar(total_steps, start_step, "dpo") as bar:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            idx = batch_indices(step, len(pairs), batch_size, hp.seed)
            data = [d for i in idx for d in pairs[i]]  # chosen, rejected, chosen, ...
            lr = learning_rate_at(
                step, total_steps, hp.learning_rate, hp.warmup_ratio, hp.lr_scheduler
            )
            fb_future = tc.forward_backward_custom(
                data, make_loss_fn(ref_P_2[idx], job.dpo, tie_rtol), logprobs_where="weights"
            )
            opt_future = tc.optim_step(adam_params(hp, lr))
            with stop_on_divergence(run.path, step + 1, lr):
                fb, opt = fb_future.result(), opt_future.result()
                check_finite(loss=fb.metrics["loss:sum"], grad_norm=opt.metrics["grad_norm"])
            elapsed = time.perf_counter() - t0
            last = {k: v for k, v in fb.metrics.items() if k != "loss:sum"}
            metrics.write(
                {
                    "step": step + 1,
                    "loss": fb.metrics["loss:sum"],
                    **last,  # dpo_loss, reward_accuracy, reward_margin, chosen/rejected ...
                    "learning_rate": lr,
                    "grad_norm": opt.metrics["grad_norm"],
                    "pairs_per_s": len(idx) / elapsed,
                }
            )
            bar.update(
                step + 1,
                dpo_fields(fb.metrics["loss:sum"], last["reward_accuracy"], len(idx), elapsed),
            )
            every.after_step(step + 1)  # checkpoint, eval

    # -- the servable model, its eval, summary.json -----------------------------------
    return every.finish(
        {"steps": total_steps, "pairs": len(pairs), **{f"final_{k}": v for k, v in last.items()}}
    )
