"""The training engine: the primitives of ARCHITECTURE.md, implemented once.

One engine owns one model (full or LoRA), its optimizer and its image preprocessor.
Clients (in-process or the HTTP server) call these methods; recipes never touch the
model directly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmtune.engine import losses
from vlmtune.engine.batching import Batch, collate, pack_rows, packing_efficiency
from vlmtune.engine.logprobs import selected_token_logprobs
from vlmtune.engine.sampling import generate
from vlmtune.models.loading import LoadedModel, load_model, save_model_dir
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
    TensorData,
)

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class EngineConfig:
    """What the engine is built from (one per training run)."""

    base_model: str
    mode: Literal["full", "lora", "qlora"] = "lora"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    freeze_vision_tower: bool = True
    freeze_projector: bool = True
    # The vocabulary matrix is most of a small model's weights (151,936 x hidden): its
    # dense gradient and Adam state dominate a CPU step, and a tied LM head shares it.
    freeze_embeddings: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_images_per_message: int | None = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    micro_batch_size: int = 1
    packing: bool = False  # several examples per row, positions restarting per example
    max_row_tokens: int = 4096  # a packed row's capacity
    gradient_checkpointing: bool = False
    seed: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where the device supports it, else fp32 (CPU bf16 matmuls are slow and lossy)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _unwrap_hf(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForConditionalGeneration`` under a peft wrapper (adapters stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class TrainingEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        self.loaded = loaded or load_model(
            config.base_model,
            mode=config.mode,
            lora_r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            freeze_vision_tower=config.freeze_vision_tower,
            freeze_projector=config.freeze_projector,
            dtype=self.dtype,
            device=str(self.device),
            gradient_checkpointing=config.gradient_checkpointing,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        )
        self.model = self.loaded.model
        self.processor = self.loaded.processor
        self.hf_model = _unwrap_hf(self.model)
        self.backbone = self.hf_model.model  # Qwen3VLModel: vision tower + language model
        hf_config = self.hf_model.config
        self.image_token_id: int = hf_config.image_token_id
        self.spatial_merge: int = hf_config.vision_config.spatial_merge_size
        tokenizer = self.processor.tokenizer
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_preprocessor = ImagePreprocessor(
            self.processor.image_processor, config.min_pixels, config.max_pixels
        )
        self.renderer = Renderer(tokenizer, self.image_preprocessor, config.max_images_per_message)
        if config.freeze_embeddings:
            self.hf_model.get_input_embeddings().weight.requires_grad_(False)
            self.hf_model.lm_head.weight.requires_grad_(False)
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.vision_trainable = any(p.requires_grad for p in self.backbone.visual.parameters())
        self.optimizer: torch.optim.AdamW | None = None
        self.step = 0
        self.last_packing_efficiency = 1.0
        self._reference: TrainingEngine | None = None

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

    def _micro_batches(self, datums: Sequence[Datum]) -> list[tuple[list[int], Batch]]:
        """(original datum indices, collated batch) per micro-batch.

        Packed: each row of up to ``max_row_tokens`` is one micro-batch. Otherwise
        ``micro_batch_size`` examples, right-padded.
        """
        if self.config.packing:
            lengths = [d.model_input.length for d in datums]
            rows = pack_rows(lengths, self.config.max_row_tokens)
            self.last_packing_efficiency = packing_efficiency(
                lengths, rows, self.config.max_row_tokens
            )
            groups = rows
        else:
            mb = max(1, self.config.micro_batch_size)
            groups = [list(range(i, min(i + mb, len(datums)))) for i in range(0, len(datums), mb)]
        out = []
        for idx in groups:
            members = [datums[i] for i in idx]
            rows_arg = [list(range(len(idx)))] if self.config.packing else None
            out.append((idx, self.collate(members, rows_arg)))
        return out

    # ---- the forward pass -------------------------------------------------------------
    def _hidden_states(self, batch: Batch) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": batch.input_ids_B_T,
            # Packed rows pass no mask: transformers then builds a block-diagonal causal
            # mask (or varlen flash-attention) from the restarting text positions.
            "attention_mask": None if batch.packed else batch.attention_mask_B_T,
            "position_ids": batch.position_ids_4_B_T,
            # A KV cache (on by default) also switches off transformers' packed-row mask.
            "use_cache": False,
        }
        if batch.pixel_values is not None:
            pixel_values = batch.pixel_values.to(self.dtype)
            if self.vision_trainable:
                kwargs["pixel_values"] = pixel_values
                kwargs["image_grid_thw"] = batch.image_grid_thw
            else:
                # A frozen tower needs no activations kept for backward.
                with torch.no_grad():
                    encoded = self.backbone.get_image_features(
                        pixel_values, batch.image_grid_thw, return_dict=True
                    )
                kwargs["mm_encoder_outputs"] = {"image": encoded}
        return self.backbone(**kwargs).last_hidden_state  # (B, T, H)

    def token_logprobs(self, batch: Batch, needed_B_T: torch.Tensor) -> torch.Tensor:
        """``log p(target_t)`` at the ``needed`` positions, zeros elsewhere; (B, T) fp32."""
        hidden_B_T_H = self._hidden_states(batch)
        needed_B_T = needed_B_T & batch.attention_mask_B_T.bool()
        lp_N = selected_token_logprobs(
            hidden_B_T_H[needed_B_T], self.hf_model.lm_head, batch.targets_B_T[needed_B_T]
        )
        logprobs_B_T = torch.zeros(needed_B_T.shape, dtype=torch.float32, device=lp_N.device)
        return logprobs_B_T.masked_scatter(needed_B_T, lp_N)

    @staticmethod
    def _needed_positions(batch: Batch, loss_fn: str) -> torch.Tensor:
        if loss_fn == "cross_entropy":
            return batch.loss_inputs["weights"] != 0
        if loss_fn in ("importance_sampling", "ppo"):
            return batch.loss_inputs["advantages"] != 0
        return batch.attention_mask_B_T.bool()

    def _builtin_loss(
        self, batch: Batch, logprobs_B_T: torch.Tensor, loss_fn: str, config: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        li = batch.loss_inputs
        if loss_fn == "cross_entropy":
            return losses.cross_entropy_loss(logprobs_B_T, li["weights"])
        if loss_fn == "importance_sampling":
            return losses.importance_sampling_loss(logprobs_B_T, li["logprobs"], li["advantages"])
        if loss_fn == "ppo":
            return losses.ppo_clip_loss(
                logprobs_B_T,
                li["logprobs"],
                li["advantages"],
                clip_low=float(config.get("clip_low_threshold", config.get("clip_low", 0.2))),
                clip_high=float(config.get("clip_high_threshold", config.get("clip_high", 0.2))),
            )
        raise ValueError(f"unknown loss_fn {loss_fn!r}; built-ins: {sorted(losses.BUILTIN_LOSSES)}")

    @staticmethod
    def _per_datum(batch: Batch, values_B_T: torch.Tensor) -> list[torch.Tensor]:
        return [values_B_T[b, start : start + n] for b, start, n in batch.segments]

    @staticmethod
    def _as_outputs(per_datum: list[torch.Tensor]) -> list[dict[str, TensorData]]:
        return [
            {
                "logprobs": TensorData(
                    data=t.detach().float().cpu().tolist(), dtype="float32", shape=[t.numel()]
                )
            }
            for t in per_datum
        ]

    def _run(
        self, datums: Sequence[Datum], loss_fn: str, config: dict[str, float] | None, backward: bool
    ) -> ForwardBackwardOutput:
        self.model.train(backward)
        per_datum: list[torch.Tensor | None] = [None] * len(datums)
        metrics: dict[str, float] = {}
        with torch.set_grad_enabled(backward):
            for idx, batch in self._micro_batches(datums):
                logprobs_B_T = self.token_logprobs(batch, self._needed_positions(batch, loss_fn))
                loss, mb_metrics = self._builtin_loss(batch, logprobs_B_T, loss_fn, config or {})
                if backward:
                    loss.backward()
                for i, lp in zip(idx, self._per_datum(batch, logprobs_B_T.detach()), strict=True):
                    per_datum[i] = lp
                _merge_metrics(metrics, mb_metrics)
        if self.config.packing:
            metrics["packing_efficiency"] = self.last_packing_efficiency
        return ForwardBackwardOutput(loss_fn_outputs=self._as_outputs(per_datum), metrics=metrics)

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
        self, datums: Sequence[Datum], loss_fn: CustomLossFn
    ) -> ForwardBackwardOutput:
        """Exact autograd through a user loss on per-token logprobs (one pass).

        ``loss_fn(datums, logprobs)`` gets one ``(T_i,)`` tensor per datum, attached to
        the graph. All micro-batches' graphs are held until the loss is computed, since
        a loss may couple data (DPO pairs): memory grows with ``len(datums)``.
        """
        self.model.train(True)
        per_datum: list[torch.Tensor | None] = [None] * len(datums)
        for idx, batch in self._micro_batches(datums):
            logprobs_B_T = self.token_logprobs(batch, batch.attention_mask_B_T.bool())
            for i, lp in zip(idx, self._per_datum(batch, logprobs_B_T), strict=True):
                per_datum[i] = lp
        loss, metrics = loss_fn(list(datums), per_datum)
        loss.backward()
        metrics = {**metrics, "loss:sum": float(loss.detach())}
        return ForwardBackwardOutput(loss_fn_outputs=self._as_outputs(per_datum), metrics=metrics)

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
            self.optimizer = torch.optim.AdamW(
                self.trainable_params, lr=params.learning_rate, foreach=True
            )
        for group in self.optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return OptimStepResponse(
            metrics={"grad_norm": float(grad_norm), "learning_rate": params.learning_rate}
        )

    def sample(
        self, prompts: Sequence[ModelInput], num_samples: int, params: SamplingParams
    ) -> list[SampleResponse]:
        """Sample ``num_samples`` completions for each prompt with the live weights."""
        return generate(self, prompts, num_samples, params)

    # ---- state ------------------------------------------------------------------------
    def save_state(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Resumable state (trainable weights, optimizer, RNG, step), written atomically."""
        path = Path(path)
        with _atomic_dir(path) as tmp:
            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            }
            save_file(trainable, str(tmp / "trainable.safetensors"))
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            meta = {"step": self.step, "engine": asdict(self.config), "extra": extra or {}}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        return path

    def load_state(self, path: str | Path) -> dict[str, Any]:
        """Restore what ``save_state`` wrote; returns its ``extra`` dict."""
        path = Path(path)
        tensors = load_file(str(path / "trainable.safetensors"))
        params = dict(self.model.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise ValueError(f"{path}: checkpoint has parameters this model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        if (path / "optimizer.pt").exists():
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(self.trainable_params, lr=0.0, foreach=True)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        meta = json.loads((path / "state.json").read_text())
        self.step = int(meta["step"])
        return meta.get("extra", {})

    def save_weights_for_sampler(self, path: str | Path) -> Path:
        """A servable HF directory (full model, or LoRA adapter) with processor files."""
        return save_model_dir(self.loaded, self.processor, Path(path))


def _merge_metrics(into: dict[str, float], new: dict[str, float]) -> None:
    """Combine micro-batch metrics by the reduction their name carries (``:sum``, ``:mean``)."""
    for k, v in new.items():
        if k not in into:
            into[k] = v
        elif k.endswith(":sum"):
            into[k] += v
        elif k.endswith(":max"):
            into[k] = max(into[k], v)
        else:  # means of micro-batch means: good enough for reporting
            into[k] = (into[k] + v) / 2


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _atomic_dir:
    """Write into a temp dir beside ``path``; rename into place only on success."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
