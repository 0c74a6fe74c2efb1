"""Memory per GPU of a training run, by part, before anything is loaded.

The estimate follows what *this* engine does, not a generic recipe:

- one process: weights in the compute dtype; full fine-tuning keeps grads and AdamW
  state in that dtype too; LoRA adapters (and their grads and state) are fp32;
- FSDP (several processes, or one with ``fsdp`` or CPU offload): full fine-tuning
  stores fp32 master weights, grads and AdamW state sharded 1/N per GPU, LoRA keeps the frozen base in the compute
  dtype, sharded; on top of the shards, the root group (embeddings, LM head, vision
  stem and mergers) stays gathered for the whole step and two decoder layers are
  gathered at a time (all of them with ``reshard_after_forward=False``);
- QLoRA (one GPU): 4-bit language-model linears; peft's k-bit preparation upcasts
  every other weight (embeddings, LM head, vision tower) to fp32;
- activations: ``planning/activations.py`` (the moment of the step that holds the
  peak, with the vision tower's share for the image tokens of the row).

``MemoryEstimate.parts`` says what each term is made of, so that a plan that does not
fit can name the part that is too big (``planning/fit.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from vlmtune.planning.activations import (
    HEAD_CHUNK_LOGITS_BUDGET,
    activation_bytes_per_token_layer,
    step_activations,
)

__all__ = [
    "HEAD_CHUNK_LOGITS_BUDGET",
    "GIB",
    "MemoryEstimate",
    "ModelDims",
    "activation_bytes_per_token_layer",
    "dims_for",
    "estimate_memory",
]

GIB = 2**30
# CUDA context, cuBLAS workspace and NCCL buffers: measured ~0.6-1.2 GiB on H100s.
GPU_RUNTIME_OVERHEAD = 1 * GIB
# nf4 with double quantisation: 4 bits + one 8-bit scale per 64 weights + fp32 scales of those.
QLORA_BYTES_PER_PARAM = 0.52

Mode = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class ModelDims:
    """The shapes that decide memory. ``intermediate`` is per expert for MoE models."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_mergers: int  # the final merger plus one per deepstack layer
    vision_positions: int = 2304
    experts: int = 0
    experts_active: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        h = self.hidden
        return 2 * h * self.q_dim + 2 * h * self.kv_dim + 2 * self.head_dim + 2 * h

    @property
    def mlp_params(self) -> int:
        if self.experts:
            return self.experts * 3 * self.hidden * self.intermediate + self.hidden * self.experts
        return 3 * self.hidden * self.intermediate

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def projector_params(self) -> int:
        merged = 4 * self.vision_hidden  # 2x2 patches merged
        return self.vision_mergers * (merged * merged + merged * self.hidden + 2 * merged)

    @property
    def vision_params(self) -> int:
        """Vision tower *including* the projector (mergers)."""
        vh, vi = self.vision_hidden, self.vision_intermediate
        block = 4 * vh * vh + 2 * vh * vi + 10 * vh
        stem = 1536 * vh + self.vision_positions * vh
        return self.vision_layers * block + stem + self.projector_params

    @property
    def total_params(self) -> int:
        text = self.layers * self.layer_params + self.embedding_params + self.head_params
        return text + self.hidden + self.vision_params

    def lora_params(self, rank: int, vision: bool = False) -> int:
        """Adapter parameters of peft on every language-model linear (and vision ones)."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attn = (h + q) + 2 * (h + kv) + (q + h)
        # MoE experts are fused 3-D weights and the router a bare parameter, neither an
        # nn.Linear: on MoE layers only attention gets adapters.
        mlp = 0 if self.experts else 3 * (h + self.intermediate)
        n = rank * self.layers * (attn + mlp)
        if vision:
            vh, vi = self.vision_hidden, self.vision_intermediate
            n += rank * self.vision_layers * ((vh + 3 * vh) + 2 * vh + 2 * (vh + vi))
            merged = 4 * vh
            n += rank * self.vision_mergers * ((merged + merged) + (merged + self.hidden))
        return n


def _qwen(
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    tied: bool,
    vision: tuple[int, int, int],
    experts: tuple[int, int] = (0, 0),
) -> ModelDims:
    return ModelDims(
        vocab=151_936,
        hidden=hidden,
        intermediate=inter,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=128,
        tied_embeddings=tied,
        vision_hidden=vision[0],
        vision_intermediate=vision[1],
        vision_layers=vision[2],
        vision_mergers=4,
        experts=experts[0],
        experts_active=experts[1],
    )


_SMALL_VISION = (1024, 4096, 24)
_LARGE_VISION = (1152, 4304, 27)
# From the published config.json of each checkpoint (a test checks that the parameter
# counts these imply match the registry's published totals within 2%).
KNOWN_DIMS: dict[str, ModelDims] = {
    "Qwen/Qwen3-VL-2B-Instruct": _qwen(2048, 6144, 28, 16, 8, True, _SMALL_VISION),
    "Qwen/Qwen3-VL-4B-Instruct": _qwen(2560, 9728, 36, 32, 8, True, _SMALL_VISION),
    "Qwen/Qwen3-VL-8B-Instruct": _qwen(4096, 12288, 36, 32, 8, False, _LARGE_VISION),
    "Qwen/Qwen3-VL-32B-Instruct": _qwen(5120, 25600, 64, 64, 8, False, _LARGE_VISION),
    "Qwen/Qwen3-VL-30B-A3B-Instruct": _qwen(
        2048, 768, 48, 32, 4, False, _LARGE_VISION, experts=(128, 8)
    ),
    "Qwen/Qwen3-VL-235B-A22B-Instruct": _qwen(
        4096, 1536, 94, 64, 4, False, _LARGE_VISION, experts=(128, 8)
    ),
}


def dims_from_config(config: dict) -> ModelDims:
    """Dims from a Qwen3-VL ``config.json`` (as a dict)."""
    text, vision = config["text_config"], config["vision_config"]
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return ModelDims(
        vocab=text["vocab_size"],
        hidden=text["hidden_size"],
        intermediate=text.get("moe_intermediate_size") or text["intermediate_size"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        tied_embeddings=bool(tied),
        vision_hidden=vision["hidden_size"],
        vision_intermediate=vision["intermediate_size"],
        vision_layers=vision["depth"],
        vision_mergers=1 + len(vision.get("deepstack_visual_indexes", [])),
        vision_positions=vision.get("num_position_embeddings", 2304),
        experts=text.get("num_experts", 0) or 0,
        experts_active=text.get("num_experts_per_tok", 0) or 0,
    )


def dims_for(model: str) -> ModelDims:
    """Dims of a registry model, the tiny model, or a local checkpoint directory."""
    from vlmtune.models.registry import get_model_spec
    from vlmtune.models.tiny import (
        MOE_TEXT_CONFIG,
        TEXT_CONFIG,
        TINY_MODEL_NAME,
        TINY_MOE_MODEL_NAME,
        VISION_CONFIG,
    )

    spec = get_model_spec(model)
    if spec.name in KNOWN_DIMS:
        return KNOWN_DIMS[spec.name]
    if spec.name in (TINY_MODEL_NAME, TINY_MOE_MODEL_NAME):
        moe = spec.name == TINY_MOE_MODEL_NAME
        return dims_from_config(
            {
                "text_config": {**TEXT_CONFIG, **(MOE_TEXT_CONFIG if moe else {})},
                "vision_config": VISION_CONFIG,
                "tie_word_embeddings": True,
            }
        )
    return dims_from_config(json.loads((Path(model).expanduser() / "config.json").read_text()))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (``host`` is per process, in CPU memory, for CPU offload)."""

    params: int
    trainable_params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    host: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    # (term, what, bytes): what each of weights/grads/optimizer/activations holds
    parts: tuple[tuple[str, str, int], ...] = field(default_factory=tuple)
    activation_phase: str = ""  # the moment of the step that holds the activation peak

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.overhead

    def as_dict(self) -> dict[str, object]:
        parts = [{"term": t, "what": w, "bytes": b} for t, w, b in self.parts]
        return {**asdict(self), "notes": list(self.notes), "parts": parts, "total": self.total}

    def term_parts(self, term: str) -> list[tuple[str, int]]:
        return [(w, b) for t, w, b in self.parts if t == term]


def estimate_memory(
    dims: ModelDims,
    *,
    mode: Mode,
    context: int,
    world_size: int = 1,
    activation_checkpointing: bool = False,
    device: Literal["cuda", "cpu"] = "cuda",
    precision: Literal["bf16", "fp32"] = "bf16",
    lora_rank: int = 16,
    cpu_offload: bool = False,
    fsdp: bool = False,
    replicate: bool = False,
    reshard_after_forward: bool = True,
    reduce_dtype: Literal["fp32", "bf16"] = "fp32",
    freeze_vision: bool = True,
    freeze_embeddings: bool = False,
    packed: bool = True,
    attention: Literal["sdpa", "flash_attention_2"] = "sdpa",
    weighted_tokens: int | None = None,
    image_tokens: int = 0,
) -> MemoryEstimate:
    """Peak bytes per GPU of one training step on a row of ``context`` tokens, of which
    ``image_tokens`` are image positions (each ``PATCHES_PER_IMAGE_TOKEN`` tower patches).

    ``packed`` and ``attention`` no longer change the estimate: packed rows build no
    attention mask under either kernel. They stay for the callers that pass them."""
    notes: list[str] = []
    parts: list[tuple[str, str, int]] = []
    cb = 4 if precision == "fp32" or device == "cpu" else 2
    dt = "fp32" if cb == 4 else "bf16"
    n = max(1, world_size)
    # One process shards too when asked (or offloading). qlora never shards: 4-bit
    # weights are replicated on every GPU and only LoRA gradients are all-reduced.
    replicated = n > 1 and (replicate or mode == "qlora")
    sharded = (n > 1 or fsdp or cpu_offload) and not replicated and mode != "qlora"
    P = dims.total_params
    vision = dims.vision_params
    embed = dims.embedding_params + dims.head_params

    # -- what trains -------------------------------------------------------------------
    if mode == "full":
        trainable = P - (vision if freeze_vision else 0) - (embed if freeze_embeddings else 0)
    else:
        trainable = dims.lora_params(lora_rank, vision=not freeze_vision)
    if mode != "full" and dims.experts:
        notes.append("MoE: LoRA adapts attention only (fused experts train in mode full)")
    if replicated:
        notes.append(f"data-parallel: the whole model on each of {n} GPUs (not sharded)")
    what = f"{trainable / 1e9:.2f}B trainable" + (f" / {n} GPUs" if sharded else "")

    # -- weights, grads, optimizer ---------------------------------------------------------
    if mode == "qlora":
        quantised = dims.layers * (dims.layer_params - 2 * dims.hidden - 2 * dims.head_dim)
        weights = int(quantised * QLORA_BYTES_PER_PARAM) + 4 * (P - quantised) + 4 * trainable
        grads, optimizer = 4 * trainable, 8 * trainable
        grads += 4 * trainable if replicated else 0  # the all-reduce's flat fp32 bucket
        parts.append(("weights", "4-bit decoder linears, fp32 rest and adapters", weights))
    elif not sharded:
        state_bytes = cb if mode == "full" else 4  # peft keeps adapters in fp32
        weights = cb * P + (4 * trainable if mode == "lora" else 0)
        grads, optimizer = state_bytes * trainable, 2 * state_bytes * trainable
        grads += 4 * trainable if replicated else 0  # the all-reduce's flat fp32 bucket
        parts.append(("weights", f"the whole model in {dt}, on this GPU", weights))
    else:
        stored = 4 * P if mode == "full" else cb * P + 4 * trainable
        weights, grads, optimizer = stored // n, 4 * trainable // n, 8 * trainable // n
        parts.append(("weights", f"{'fp32' if mode == 'full' else dt} shards (1/{n})", weights))
        parts.append(("grads", f"fp32 gradient shards (1/{n})", grads))
        # Gathered on top of the shards: the root group all step, and layers in flight.
        root = dims.embedding_params + dims.head_params + dims.projector_params
        in_flight = 2 if reshard_after_forward else dims.layers
        gathered_root, gathered_layers = cb * root, cb * in_flight * dims.layer_params
        parts.append(
            ("weights", f"root gathered in {dt} (embeddings, LM head, mergers)", gathered_root)
        )
        parts.append(("weights", f"{in_flight} decoder layers gathered at a time", gathered_layers))
        weights += gathered_root + gathered_layers
        rb = 4 if reduce_dtype == "fp32" or device == "cpu" else 2
        per_layer_grad = dims.layer_params if mode == "full" else trainable // dims.layers
        root_grad = (0 if freeze_embeddings else embed) if mode == "full" else 0
        unsharded = rb * (per_layer_grad + root_grad)
        parts.append(
            ("grads", "unsharded grads before reduce-scatter (a layer, the root)", unsharded)
        )
        grads += unsharded
    if not sharded or mode == "qlora":
        parts.append(("grads", f"gradients of {what}", grads))
    parts.append(("optimizer", f"AdamW moments of {what}", optimizer))
    host = 0
    if cpu_offload and sharded:
        shards = (4 * P if mode == "full" else cb * P) // n + 12 * trainable // n
        # AdamW's fused step (engine/optim.py) makes no parameter-sized temporaries.
        host = shards
        weights -= (4 * P if mode == "full" else cb * P + 4 * trainable) // n
        grads -= 4 * trainable // n
        optimizer = 0
        # The shards and the optimizer state leave the GPU: only gathered copies stay.
        parts = [p for p in parts if "shards" not in p[1] and p[0] != "optimizer"]
        notes.append("CPU offload: shards and AdamW state in host memory (see host)")

    # -- activations ---------------------------------------------------------------------
    n_weighted = context if weighted_tokens is None else min(context, weighted_tokens)
    act = step_activations(
        dims,
        cb=cb,
        context=context,
        weighted=n_weighted,
        image_tokens=image_tokens,
        checkpointing=activation_checkpointing,
        vision_trainable=not freeze_vision,
    )
    parts += [("activations", w, b) for w, b in act.parts]

    return MemoryEstimate(
        params=P,
        trainable_params=trainable,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=act.peak,
        overhead=GPU_RUNTIME_OVERHEAD if device == "cuda" else 0,
        host=host,
        notes=tuple(notes),
        parts=tuple(parts),
        activation_phase=act.phase,
    )
