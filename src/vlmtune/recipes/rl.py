"""Reinforcement learning (GRPO-style): one loop over a ``TrainingClient``, top to bottom.

    prompts --(per step: sample a group per prompt with the live weights, reward,
               advantages = reward - group mean, forward_backward, optim_step)--> final/

Group-relative advantages need no value model (Shao et al. 2024, DeepSeekMath §4.1.2):
``A_i = r_i - mean(r)`` over the ``group_size`` completions of one prompt, optionally
divided by the group's std. A group whose rewards are all equal has zero advantage
everywhere and teaches nothing, so it is skipped (and counted).

Each completion becomes one datum in the hosted-SDK layout (Tinker's RL datums):
``model_input = prompt + completion[:-1]``, ``target_tokens`` shifted by one, and on
the completion's positions the sampler's log-probs and the advantage (zero on prompt
positions). The built-in ``importance_sampling`` (or ``ppo``) loss then corrects for
any sampler/learner mismatch. Advantages are divided by the step's number of trained
completion tokens, so the summed loss is a per-token mean over the step, as SFT's
weight scaling makes its loss.

With ``kl_coef > 0`` the loss gains ``kl_coef * mean k3(pi, ref)`` over those tokens
(Schulman 2020's estimator) through ``forward_backward_custom``; the reference
log-probs come from ``forward_reference`` (LoRA adapter disabled, or a frozen copy of
the base for full fine-tuning) on the same datums.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmtune.config import ConfigError, JobFile, RLConfig
from vlmtune.data import Message, RLRow, SFTRow, TextPart
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
from vlmtune.recipes.progress import MovingAverage, ProgressBar, rl_fields
from vlmtune.recipes.skipped_groups import SKIP_WARNING_WINDOW, SkippedGroups
from vlmtune.render_rows import RenderLimits, render_rows
from vlmtune.rewards import (
    RewardError,
    canonical_spec,
    resolve_reward,
    row_dict,
    safe_reward,
    score_group,
)
from vlmtune.sdk import ServiceClientProtocol
from vlmtune.types import (
    Datum,
    EncodedTextChunk,
    ModelInput,
    SampledSequence,
    SamplingParams,
    TensorData,
)

MAX_LOGGED_ERRORS_PER_STEP = 3


def advantages_or_skip(rewards_G: list[float], normalize_std: bool) -> list[float] | None:
    """GRPO advantages of one group (``losses.group_advantages``), or None when every
    reward is equal: then every advantage is 0 and the group carries no signal."""
    if max(rewards_G) == min(rewards_G):
        return None
    return losses.group_advantages(torch.tensor(rewards_G), normalize_std=normalize_std).tolist()


def reward_spread(rewards: list[float]) -> dict[str, float]:
    """A step's rewards as five numbers: min, quartiles, max. Nearest rank, never
    interpolated: each is a reward some sample got, so a reward of a few values
    (exact match: 0 or 1) keeps to them and its report can show it as shares."""
    r = sorted(rewards)

    def at(q: float) -> float:
        return r[round(q * (len(r) - 1))]

    return {
        "reward_min": r[0],
        "reward_p25": at(0.25),
        "reward_median": at(0.5),
        "reward_p75": at(0.75),
        "reward_max": r[-1],
    }


def completion_datum(
    prompt: ModelInput, prompt_ids: list[int], seq: SampledSequence, advantage: float
) -> Datum:
    """Datum for one sampled completion: the advantage on its tokens, 0 on the prompt's."""
    P, C = len(prompt_ids), len(seq.tokens)
    model_input = prompt if C == 1 else prompt.append(EncodedTextChunk(tokens=seq.tokens[:-1]))
    zeros = [0.0] * (P - 1)  # input position t predicts token t+1: the prompt's own tail
    sampler_logprobs = seq.logprobs or [0.0] * C
    return Datum(
        model_input=model_input,
        loss_fn_inputs={
            "target_tokens": TensorData(data=prompt_ids[1:] + seq.tokens, dtype="int64"),
            "logprobs": TensorData(data=zeros + list(sampler_logprobs), dtype="float32"),
            "advantages": TensorData(data=zeros + [advantage] * C, dtype="float32"),
        },
    )


def completion_mask(datum: Datum, n_completion: int) -> Datum:
    """The same sequence with ``weights`` 1 on its completion: for reference log-probs."""
    n = len(datum.loss_fn_inputs["target_tokens"].data)
    weights = [0.0] * (n - n_completion) + [1.0] * n_completion
    return Datum(
        model_input=datum.model_input,
        loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "weights": TensorData(data=weights, dtype="float32"),
        },
    )


def make_kl_loss_fn(
    ref_logprobs: list[torch.Tensor], n_tokens: int, rl: RLConfig
) -> Callable[[list[Datum], list[torch.Tensor]], losses.LossOutput]:
    """Policy-gradient loss + ``kl_coef`` * per-token mean k3 KL to the reference."""

    def loss_fn(datums: list[Datum], logprobs: list[torch.Tensor]) -> losses.LossOutput:
        pg_total: torch.Tensor | float = 0.0
        kl_total: torch.Tensor | float = 0.0
        for d, lp_T, ref_T in zip(datums, logprobs, ref_logprobs, strict=True):
            adv_T = d.loss_fn_inputs["advantages"].to_torch().to(lp_T.device)
            mask_T = adv_T != 0  # the completion (advantages were scaled, never exactly 0)
            lp_N, adv_N = lp_T[mask_T][None], adv_T[mask_T][None]
            old_N = d.loss_fn_inputs["logprobs"].to_torch().to(lp_T.device)[mask_T][None]
            if rl.loss == "ppo":
                pg, _ = losses.ppo_clip_loss(lp_N, old_N, adv_N, rl.clip_low, rl.clip_high)
            else:
                pg, _ = losses.importance_sampling_loss(lp_N, old_N, adv_N)
            ref_N = ref_T.to(lp_T.device)[mask_T][None]
            pg_total = pg_total + pg
            kl_total = kl_total + losses.kl_penalty_k3(lp_N, ref_N).sum() / n_tokens
        # A step trains at least one completion, so both sums are tensors by now.
        assert isinstance(pg_total, torch.Tensor) and isinstance(kl_total, torch.Tensor)
        loss = pg_total + rl.kl_coef * kl_total
        return loss, {"kl": float(kl_total.detach()), "pg_loss": float(pg_total.detach())}

    return loss_fn


def run(
    job: JobFile,
    run_dir: Path,
    *,
    resume: bool = False,
    log: LogFn = print,
    config_dir: str | Path = ".",
    service: ServiceClientProtocol | None = None,
) -> dict[str, Any]:
    """``config_dir``: where a relative ``rl.reward`` file path resolves (the TOML's folder).
    ``service``: where the engine runs (``connect(url)`` for a server; default: here)."""
    hp, rl = job.hyperparameters, job.rl
    log = main_process_log(log)  # under torchrun only rank 0 logs (and writes files)
    # A reward that cannot be resolved is a config error, found before any work.
    try:
        reward_fn = resolve_reward(rl.reward, regex=rl.reward_regex, base_dir=config_dir)
    except RewardError as e:
        raise ConfigError("job file", [f"rl.reward: {e}"]) from None
    rl.reward = canonical_spec(rl.reward, config_dir)  # the saved config stays runnable
    if rl.temperature == 0:
        log("rl.temperature = 0: greedy groups are identical and will all be skipped")
    run = prepare(job, "rl", run_dir, log, service, resume=resume)

    # -- data: prompts ending in a user turn, images included, metadata for the reward --
    rows, train_report, val_rows, val_report = load_job_data(job, "rl")
    check_rows_fit(job, "rl", rows)  # before the model loads

    tc = create_training_client(job, run.path, service)
    log(tc.describe())
    renderer = tc.renderer
    # The checks of `vlmtune data validate --config` (prompt + max_tokens must fit, ...):
    # drops move into the reports.
    limits = RenderLimits.for_job(job)
    rendered = render_rows(rows, renderer, limits, train_report)
    prompts = [
        (r.sides[0].model_input, r.sides[0].model_input.to_ints(renderer.image_token_id))
        for r in rendered
    ]
    kept = rows_of(rendered, RLRow)
    if val_report is not None:
        val_rows = [r.row for r in render_rows(val_rows, renderer, limits, val_report)]
    report_data(run, job, train_report, val_report, len(prompts), "prompts", log)

    # -- schedule -------------------------------------------------------------------
    total_steps = total_steps_for(len(prompts), rl.prompts_per_step, hp)
    start_step = resume_start_step(tc, run, resume, log)
    metrics = run.metrics(start_step if resume else None, total_steps)
    log(
        f"RL on {len(prompts)} prompts: {total_steps} steps of {rl.prompts_per_step} prompts "
        f"x {rl.group_size} samples, reward {rl.reward}, loss {rl.loss}"
    )
    total_errors = 0
    skipped_groups = SkippedGroups(min(SKIP_WARNING_WINDOW, max(1, total_steps - start_step)))

    def evaluate(step: int) -> dict[str, Any]:
        """Greedy decoding of held-out prompts: exact match vs metadata.answer, mean reward."""
        eval_rows = val_rows[: hp.eval_max_examples]
        sft_rows = [
            SFTRow(
                r.line,
                [*r.messages, Message("assistant", [TextPart(str(r.metadata.get("answer", "")))])],
                r.metadata,
                r.tools,
            )
            for r in eval_rows
        ]
        result = evaluate_exact_match(
            tc.create_sampling_client(), sft_rows, max_new_tokens=hp.eval_max_new_tokens
        )
        scores = [
            safe_reward(reward_fn, p["prediction"], row_dict(r.messages, r.metadata, r.line))[0]
            for p, r in zip(result.predictions, eval_rows, strict=True)
        ]
        write_eval_predictions(run, step, sft_rows, result, scores)  # evals/step-N.jsonl
        record: dict[str, Any] = {"step": step, "eval/reward": sum(scores) / max(1, len(scores))}
        if all("answer" in r.metadata for r in eval_rows):
            record["eval/accuracy"] = result.accuracy
        record["eval/n"] = result.n
        metrics.write(record)
        shown = "  ".join(
            f"{k} {record['eval/' + k]:.3f}"
            for k in ("reward", "accuracy")
            if "eval/" + k in record
        )
        log(f"eval @ step {step}: {shown} (n={result.n})")  # as SFT's and DPO's
        return record

    every = Checkpointer(
        tc, run, total_steps, hp.save_every, hp.eval_every, evaluate if val_rows else None, log
    )

    # -- the loop -------------------------------------------------------------------
    last: dict[str, Any] = {}
    # over the steps the skipped-group warning looks at: one step's groups are few
    reward_avg, skipped_avg = MovingAverage(SKIP_WARNING_WINDOW), MovingAverage(SKIP_WARNING_WINDOW)
    with ProgressBar(total_steps, start_step, "rl") as bar:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            idx = batch_indices(step, len(prompts), rl.prompts_per_step, hp.seed)
            params = SamplingParams(
                max_tokens=rl.max_tokens,
                temperature=rl.temperature,
                top_p=rl.top_p,
                top_k=rl.top_k,
                stop=rl.stop or None,
                seed=hp.seed * 1_000_003 + step,  # a resumed run samples the same groups
            )
            # The sampler reads the live weights: every group is on-policy for this step.
            responses = (
                tc.create_sampling_client()
                .sample_many([prompts[i][0] for i in idx], rl.group_size, params)
                .result()
            )
            t_sample = time.perf_counter() - t0

            # -- rewards and group-relative advantages ----------------------------------
            trained: list[tuple[int, SampledSequence, float]] = []
            rewards: list[float] = []
            errors: list[str] = []
            skipped_rewards: list[float] = []  # the common reward of each skipped group
            for i, response in zip(idx, responses, strict=True):
                row = kept[i]
                texts = [renderer.decode(s.tokens) for s in response.sequences]
                rewards_G, errors_G = score_group(
                    reward_fn, texts, row_dict(row.messages, row.metadata, row.line)
                )
                rewards += rewards_G
                errors += [f"line {row.line}: {e}" for e in errors_G]
                advantages_G = advantages_or_skip(rewards_G, rl.normalize_advantages)
                if advantages_G is None:  # all rewards equal: zero advantage, nothing to learn
                    skipped_rewards.append(rewards_G[0])
                    continue
                for seq, a in zip(response.sequences, advantages_G, strict=True):
                    if a != 0:  # e.g. the middle one of rewards [0, 0.5, 1]: no signal
                        trained.append((i, seq, a))
            for error in errors[:MAX_LOGGED_ERRORS_PER_STEP]:
                log(f"step {step + 1}: reward error (scored 0) on {error}")
            if len(errors) > MAX_LOGGED_ERRORS_PER_STEP:
                log(
                    f"step {step + 1}: {len(errors) - MAX_LOGGED_ERRORS_PER_STEP} more reward errors"
                )
            total_errors += len(errors)
            warning = skipped_groups.add(skipped_rewards, len(idx), rl)
            if warning:
                log(f"step {step + 1}: {warning}")

            # -- the update: a per-token mean over the step's trained completion tokens ----
            n_tokens = sum(len(seq.tokens) for _, seq, _ in trained)
            datums = [completion_datum(*prompts[i], seq, a / n_tokens) for i, seq, a in trained]
            lr = learning_rate_at(
                step, total_steps, hp.learning_rate, hp.warmup_ratio, hp.lr_scheduler
            )
            fb_metrics: dict[str, float] = {}
            grad_norm = 0.0
            if datums:  # all groups skipped: no gradient, and no optimizer step either
                if rl.kl_coef > 0:
                    masked = [
                        completion_mask(d, len(seq.tokens))
                        for d, (_, seq, _) in zip(datums, trained, strict=True)
                    ]
                    ref = tc.forward_reference(masked).result()
                    ref_lps = [o["logprobs"].to_torch() for o in ref.loss_fn_outputs]
                    fb = tc.forward_backward_custom(
                        datums,
                        make_kl_loss_fn(ref_lps, n_tokens, rl),
                        logprobs_where="advantages",
                    )
                else:
                    fb = tc.forward_backward(
                        datums,
                        rl.loss,
                        {"clip_low_threshold": rl.clip_low, "clip_high_threshold": rl.clip_high},
                    )
                opt = tc.optim_step(adam_params(hp, lr))
                with stop_on_divergence(run.path, step + 1, lr):
                    fb_metrics, grad_norm = fb.result().metrics, opt.result().metrics["grad_norm"]
                    check_finite(loss=fb_metrics.get("loss:sum"), grad_norm=grad_norm)

            seqs = [s for r in responses for s in r.sequences]
            n_sampled = sum(len(s.tokens) for s in seqs)
            last = {
                "step": step + 1,
                "loss": fb_metrics.get("loss:sum", 0.0),
                "reward_mean": sum(rewards) / len(rewards),
                **reward_spread(rewards),  # the step's distribution, for the run's report
                "frac_groups_skipped": len(skipped_rewards) / len(idx),
                "completion_len_mean": n_sampled / len(seqs),
                "frac_truncated": sum(s.stop_reason == "length" for s in seqs) / len(seqs),
                "sampler_logprob_mean": sum(sum(s.logprobs or []) for s in seqs)
                / max(1, n_sampled),
                "reward_errors": len(errors),
                "trained_tokens": n_tokens,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                **{k.split(":")[0]: v for k, v in fb_metrics.items() if k != "loss:sum"},
                "sample_s": t_sample,
                "step_s": time.perf_counter() - t0,
            }
            metrics.write(last)
            bar.update(
                step + 1,
                rl_fields(
                    reward_avg.add(sum(rewards), len(rewards)),
                    skipped_avg.add(len(skipped_rewards), len(idx)),
                    len(reward_avg),
                    len(seqs),
                    last["step_s"],
                ),
            )
            every.after_step(step + 1)  # checkpoint, eval

    # -- the servable model, its eval, summary.json -----------------------------------
    return every.finish(
        {
            "steps": total_steps,
            "prompts": len(prompts),
            "final_reward_mean": last.get("reward_mean"),
            "reward_errors": total_errors,
        }
    )
