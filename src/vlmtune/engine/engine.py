"""The training engine: the primitives of ARCHITECTURE.md, implemented once.

One engine owns one model (full or LoRA), its optimizer and its image preprocessor.
Clients (in-process or the HTTP server) call these methods; recipes never touch the
model directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vlmtune.defaults import image_cap
from vlmtune.engine import dispatch, optim, placement
from vlmtune.engine import distributed as dist_utils
from vlmtune.engine.batching import Batch, collate
from vlmtune.engine.checkpoint import load_training_state, save_training_state
from vlmtune.engine.config import HOST_SETTINGS as HOST_SETTINGS  # re-exported
from vlmtune.engine.config import RUN_SETTINGS as RUN_SETTINGS  # re-exported
from vlmtune.engine.config import EngineConfig
from vlmtune.engine.divergence import check_weights_finite
from vlmtune.engine.forward import ForwardPass
from vlmtune.engine.micro_batches import MicroBatch, plan_micro_batches
from vlmtune.engine.sampling import SamplingContext, generate
from vlmtune.engine.step_profile import NO_PROFILE, StepProfile
from vlmtune.models.adapters import is_peft_model
from vlmtune.models.loading import (
    LoadedModel,
    trainable_parameter_count,
)
from vlmtune.models.saving import save_model_dir
from vlmtune.models.structure import as_vl_model
from vlmtune.models.vision import ImagePreprocessor
from vlmtune.render import Renderer
from vlmtune.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
)

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class TrainingEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        device = placement.resolve_device(config.device)
        if config.fsdp_cpu_offload and device.type != "cuda":
            raise ValueError("fsdp_cpu_offload moves GPU memory to the host: it needs CUDA")
        self.dist = dist_utils.init_distributed(
            device, fsdp_alone=config.fsdp or config.fsdp_cpu_offload
        )
        if self.dist.enabled and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.device = device
        self.dtype = placement.resolve_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        # Replicated ranks each load the whole model onto their own device, as one
        # process does; only the trainable gradients cross processes.
        self.replicated = self.dist.enabled and (config.replicate or config.mode == "qlora")
        self.loaded = loaded or placement.load_placed(
            config,
            self.dist,
            self.device,
            self.dtype,
            sharded=self.dist.enabled and not self.replicated,
        )
        self.model = self.loaded.model
        self.processor = self.loaded.processor
        self.hf_model = as_vl_model(placement.unwrap_hf(self.model))
        self.backbone = self.hf_model.model  # Qwen3VLModel: vision tower + language model
        if config.attention == "sdpa":
            # Packed rows attend per example, without a T x T mask; the rest is SDPA.
            from vlmtune.models.packed_attention import use_packed_attention

            use_packed_attention(self.hf_model)
        hf_config = self.hf_model.config
        self.image_token_id: int = hf_config.image_token_id
        self.spatial_merge: int = hf_config.vision_config.spatial_merge_size
        tokenizer = self.processor.tokenizer
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_preprocessor = ImagePreprocessor(
            self.processor.image_processor,
            config.min_pixels,
            config.max_pixels,
            cache_dir=config.image_cache_dir,
        )
        cap = image_cap(config.base_model, config.max_images_per_message)
        self.renderer = Renderer(tokenizer, self.image_preprocessor, cap)
        if config.freeze_embeddings:
            self.hf_model.get_input_embeddings().weight.requires_grad_(False)
            self.hf_model.lm_head.weight.requires_grad_(False)
        self._root: dist_utils.ShardedRoot | None = None
        # Second names of shared (tied) parameters, e.g. lm_head.weight: a gathered
        # state dict holds them as separate copies, which save_pretrained would keep.
        self._tied_names = placement.duplicate_param_names(self.model)
        if self.dist.enabled and not self.replicated:
            self._root = self._shard()
        # After sharding: fully_shard replaces every parameter with a DTensor shard.
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.vision_trainable = any(p.requires_grad for p in self.backbone.visual.parameters())
        self._forward = ForwardPass(
            self.backbone,
            self.hf_model.lm_head,
            self.dtype,
            self.spatial_merge,
            self.vision_trainable,
            sharded=self._root is not None,
        )
        self.optimizer: torch.optim.AdamW | None = None
        self._profile: StepProfile = NO_PROFILE
        self.step = 0
        self.last_packing_efficiency = 1.0
        self._reference: TrainingEngine | None = None

    def describe(self) -> str:
        """One line for a run's log: what trains, on what, sharded or not."""
        trainable, total = trainable_parameter_count(self.model)
        where = f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"
        if self.dist.enabled:
            plural = "es" if self.dist.world_size > 1 else ""
            how = "replicated" if self.replicated else "FSDP2"
            where += f", {how} over {self.dist.world_size} process{plural}"
        return (
            f"model {self.loaded.spec.name} ({self.loaded.mode}; {where}): "
            f"{trainable:,} of {total:,} parameters train"
        )

    @property
    def profile(self) -> StepProfile:
        """Where step time goes (``StepProfile``); ``NO_PROFILE`` unless a caller sets one."""
        return self._profile

    @profile.setter
    def profile(self, profile: StepProfile) -> None:
        self._profile = profile
        self._forward.profile = profile

    # ---- distributed ----------------------------------------------------------------
    def _shard(self) -> dist_utils.ShardedRoot:
        c = self.config
        root = dist_utils.shard_and_load(
            self.model,
            self.hf_model,
            self.device,
            self.dtype,
            reduce_bf16=c.fsdp_reduce_dtype == "bf16",
            reshard_after_forward=c.fsdp_reshard_after_forward,
            cpu_offload=c.fsdp_cpu_offload,
        )
        # transformers' generate() then keeps every rank stepping until all are done.
        self.hf_model._is_fsdp_managed_module = True
        return root

    def _in_root(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` inside the FSDP root's forward (a plain call in one process)."""
        if self._root is None:
            return fn(*args, **kwargs)
        return self._root(fn, *args, **kwargs)

    def _plan(self, datums: Sequence[Datum]) -> list[MicroBatch]:
        """This process's micro-batches of ``datums`` (see ``plan_micro_batches``)."""
        c = self.config
        plan, efficiency = plan_micro_batches(
            datums,
            self.collate,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            packing=c.packing,
            micro_batch_size=c.micro_batch_size,
            max_row_tokens=c.max_row_tokens,
        )
        if efficiency is not None:
            self.last_packing_efficiency = efficiency
        return plan

    # ---- batching -----------------------------------------------------------------
    def _preprocess(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values, grid_thw = self.image_preprocessor.preprocess_bytes(data)
        return pixel_values, grid_thw.reshape(-1)

    def collate(self, datums: Sequence[Datum], rows: list[list[int]] | None = None) -> Batch:
        return collate(
            datums,
            image_token_id=self.image_token_id,
            pad_token_id=self.pad_token_id,
            spatial_merge=self.spatial_merge,
            preprocess=self._preprocess,
            rows=rows,
        ).to(self.device)

    # ---- the forward pass -------------------------------------------------------------
    def token_logprobs(self, batch: Batch, needed_B_T: torch.Tensor) -> torch.Tensor:
        """``log p(target_t)`` at the ``needed`` positions, zeros elsewhere; (B, T) fp32."""
        return self._in_root(self._forward.token_logprobs, batch, needed_B_T)

    def _run(
        self, datums: Sequence[Datum], loss_fn: str, config: dict[str, float] | None, backward: bool
    ) -> ForwardBackwardOutput:
        self.model.train(backward)
        per_datum: list[torch.Tensor | None] = [None] * len(datums)
        totals: dispatch.MetricTotals = {}
        local: list[int] = []
        profile = self._profile
        with profile.phase("data"):
            plan = self._plan(datums)
        with torch.set_grad_enabled(backward):
            for idx, batch, padding in plan:
                logprobs_B_T = self.token_logprobs(batch, dispatch.needed_positions(batch, loss_fn))
                with profile.phase("loss"):
                    loss, mb_metrics = dispatch.builtin_loss(
                        batch, logprobs_B_T, loss_fn, config or {}
                    )
                # No weighted token in the micro-batch (one process; sharded ranks anchor
                # one): the loss is a constant and its gradient zero, nothing to backprop.
                if backward and loss.requires_grad:
                    with profile.phase("backward"):
                        loss.backward()
                if padding:
                    continue
                for i, lp in zip(
                    idx, dispatch.per_datum(batch, logprobs_B_T.detach()), strict=True
                ):
                    per_datum[i] = lp
                local.extend(idx)
                dispatch.add_metrics(totals, mb_metrics)
        if self.config.packing and local:
            # name:reduction, as every metric (a server passes it through unchanged)
            dispatch.add_metrics(totals, {"packing_efficiency:mean": self.last_packing_efficiency})
        if self._root is not None and not backward:
            dist_utils.reshard_all(self._root)
        if self.dist.enabled:
            per_datum, totals = dist_utils.gather_outputs(
                per_datum, totals, local, dispatch.merge_metrics
            )
        return ForwardBackwardOutput(
            loss_fn_outputs=dispatch.as_outputs(dispatch.filled(per_datum)),
            metrics=dispatch.final_metrics(totals),
        )

    # ---- primitives -------------------------------------------------------------------
    def forward(
        self,
        datums: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> ForwardBackwardOutput:
        return self._run(datums, loss_fn, loss_fn_config, backward=False)

    def forward_backward(
        self,
        datums: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> ForwardBackwardOutput:
        """Accumulate gradients of the summed built-in loss over ``datums``."""
        return self._run(datums, loss_fn, loss_fn_config, backward=True)

    def forward_backward_custom(
        self,
        datums: Sequence[Datum],
        loss_fn: CustomLossFn,
        *,
        logprobs_where: str | None = None,
    ) -> ForwardBackwardOutput:
        """Exact autograd through a user loss on per-token logprobs (one pass).

        ``loss_fn(datums, logprobs)`` gets one ``(T_i,)`` tensor per datum, attached to
        the graph. All micro-batches' graphs are held until the loss is computed, since
        a loss may couple data (DPO pairs): memory grows with ``len(datums)``.

        ``logprobs_where`` names a ``loss_fn_inputs`` key (e.g. ``"weights"``): logprobs
        are then computed only where it is non-zero, and are 0 elsewhere. A loss that
        reads only the response tokens skips the LM head on the prompt and image tokens.
        """
        if logprobs_where is not None:
            dispatch.check_input_present(datums, logprobs_where)
        self.model.train(True)
        per_datum: list[torch.Tensor | None] = [None] * len(datums)
        local: list[int] = []
        padding_terms: list[torch.Tensor] = []
        for idx, batch, padding in self._plan(datums):
            needed_B_T = (
                batch.attention_mask_B_T.bool()
                if logprobs_where is None
                else batch.loss_inputs[logprobs_where] != 0
            )
            logprobs_B_T = self.token_logprobs(batch, needed_B_T)
            if padding:
                padding_terms.append(logprobs_B_T.sum() * 0.0)
                continue
            for i, lp in zip(idx, dispatch.per_datum(batch, logprobs_B_T), strict=True):
                per_datum[i] = lp
            local.extend(idx)
        if self.dist.enabled:
            # The loss may couple data across ranks (DPO pairs), so every rank evaluates
            # it on all logprobs: its own attached to the graph, the others' as
            # constants. Summing the ranks' gradients then gives the exact gradient.
            attached = {i: per_datum[i] for i in local}
            per_datum, _ = dist_utils.gather_outputs(per_datum, {}, local, dispatch.merge_metrics)
            per_datum = [attached.get(i, lp) for i, lp in enumerate(per_datum)]
            per_datum = [lp.to(self.device) if lp is not None else None for lp in per_datum]
        logprobs = dispatch.filled(per_datum)
        loss, metrics = loss_fn(list(datums), logprobs)
        (loss + sum(padding_terms)).backward()
        metrics = {**metrics, "loss:sum": float(loss.detach())}
        return ForwardBackwardOutput(loss_fn_outputs=dispatch.as_outputs(logprobs), metrics=metrics)

    def reference_forward(
        self,
        datums: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> ForwardBackwardOutput:
        """``forward`` under the reference (base) model, for DPO and KL penalties.

        LoRA: the same weights with the adapter disabled (no second copy in memory).
        Full fine-tuning: a frozen copy of the base, loaded on first use; a recipe that
        needs reference values only for fixed data should compute them once up front.
        """
        if self.loaded.mode in ("lora", "qlora"):
            assert is_peft_model(self.model)  # load_model wraps lora and qlora models
            with self.model.disable_adapter():
                return self._run(datums, loss_fn, loss_fn_config, backward=False)
        if self._reference is None:
            ref_config = EngineConfig(**{**asdict(self.config), "mode": "full"})
            self._reference = TrainingEngine(ref_config)
            for p in self._reference.model.parameters():
                p.requires_grad_(False)
        return self._reference._run(datums, loss_fn, loss_fn_config, backward=False)

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """AdamW step with this call's hyperparameters, optional clipping; zeroes grads."""
        if self.optimizer is None:
            self.optimizer = optim.new_adamw(self.trainable_params, params.learning_rate)
        with self._profile.phase("optimizer"):
            if self.replicated:
                dist_utils.all_reduce_grads(self.trainable_params)
            grad_norm = optim.clip_and_step(
                self.optimizer, self.trainable_params, params, self.device
            )
        self.step += 1
        return OptimStepResponse(
            metrics={"grad_norm": grad_norm, "learning_rate": params.learning_rate}
        )

    def sample(
        self, prompts: Sequence[ModelInput], num_samples: int, params: SamplingParams
    ) -> list[SampleResponse]:
        """Sample ``num_samples`` completions for each prompt with the live weights.

        Under torchrun every rank generates the same prompts in lockstep (the sharded
        layers gather on every step) and all return rank 0's samples, so recipes that
        branch on samples (RL) build the same batch on every rank.
        """
        ctx = SamplingContext(
            hf_model=self.hf_model,
            mode_owner=self.model,
            collate=self.collate,
            tokenizer=self.processor.tokenizer,
            stop_token_ids=list(self.renderer.stop_token_ids),
            pad_token_id=self.pad_token_id,
            image_token_id=self.image_token_id,
            dtype=self.dtype,
        )
        if not self.dist.enabled:
            return generate(ctx, prompts, num_samples, params)
        if self._root is None:  # replicated: the same weights everywhere, rank 0's draw
            return dist_utils.broadcast_from_main(generate(ctx, prompts, num_samples, params))
        out = self._root(generate, ctx, prompts, num_samples, params)
        dist_utils.reshard_all(self._root)
        return dist_utils.broadcast_from_main(out)

    # ---- state ------------------------------------------------------------------------
    def save_state(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Resumable state (trainable weights, optimizer, RNG, step), written atomically;
        sharded per rank under torchrun, loadable on any number of processes. Non-finite
        trainable weights are refused: resuming from them could only diverge again."""
        check_weights_finite(self.trainable_params, path)
        meta = {"step": self.step, "engine": asdict(self.config), "extra": extra or {}}
        return save_training_state(Path(path), self.model, self.optimizer, self.dist, meta)

    def load_state(self, path: str | Path) -> dict[str, Any]:
        """Restore what ``save_state`` wrote; returns its ``extra`` dict."""
        if self.optimizer is None and self.trainable_params:
            self.optimizer = optim.new_adamw(self.trainable_params, 0.0)
        meta = load_training_state(Path(path), self.model, self.optimizer, self.dist)
        self.step = int(meta["step"])
        return meta.get("extra", {})

    def save_weights_for_sampler(self, path: str | Path) -> Path:
        """A servable HF directory (full model, or LoRA adapter) with processor files.

        Under torchrun the full (unsharded) weights are gathered on rank 0, which alone
        writes the directory, through the same ``save_model_dir`` as one process.
        Non-finite trainable weights are refused: a servable model full of NaN is worse
        than none.
        """
        check_weights_finite(self.trainable_params, path)
        if self._root is None:
            if self.dist.is_main:  # replicated ranks hold the same weights
                save_model_dir(self.loaded, self.processor, Path(path))
            dist_utils.barrier()
            return Path(path)
        # An adapter needs only the trainable (LoRA) weights, not the gathered base; fp32
        # master weights go out in the compute dtype, as one process saves them (half
        # the size, and a config dtype that vLLM's "auto" serves in bf16).
        full_ft = self.loaded.mode == "full"
        out_dtype = self.dtype if full_ft else None
        weights = dist_utils.full_state_dict_on_main(
            self.model, trainable_only=not full_ft, drop=self._tied_names, dtype=out_dtype
        )
        if self.dist.is_main:
            save_model_dir(self.loaded, self.processor, Path(path), weights, dtype=out_dtype)
        dist_utils.barrier()
        return Path(path)
