"""Multi-process training under ``torchrun``: process group, FSDP2 sharding, data split.

Every rank runs the same recipe and calls the primitives with the same *global* batch;
the engine gives each rank a deterministic share of it (``plan_rank_groups``). Because
every rank can compute every other rank's share locally, all ranks agree on the number
of micro-batches without communicating, which is what keeps FSDP's collectives in
lockstep (a rank with less work runs zero-weight copies).

Gradients are *summed* over ranks, not averaged: the recipes already scale each
datum's weights by the global weighted-token count, so each rank's loss is its share
of the global mean and the sum over ranks is exactly the single-process gradient.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from vlmtune.engine.batching import pack_rows
from vlmtune.models.structure import VLBackbone, VLModel

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
from vlmtune.types import Datum, TensorData

T = TypeVar("T")
V = TypeVar("V")

# Set by `vlmtune train` on the processes it starts under torchrun, so they do not
# launch torchrun again.
ENV_LAUNCHED = "VLMTUNE_LAUNCHED"


def already_launched() -> bool:
    """True inside a process torchrun started (ours, or a user's own torchrun command)."""
    return bool(os.environ.get(ENV_LAUNCHED)) or "TORCHELASTIC_RUN_ID" in os.environ


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp_alone: bool = False  # FSDP2 asked for in a single process (a 1-rank group)

    @property
    def enabled(self) -> bool:
        """True when the model is sharded with FSDP2 (and collectives run)."""
        return self.world_size > 1 or self.fsdp_alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment (1 process when unset)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo(
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the one that writes files and logs."""
    return env_info().is_main


def init_distributed(device: torch.device, *, fsdp_alone: bool = False) -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); a no-op for one process
    unless ``fsdp_alone``, which makes a group of one so that FSDP2 can shard (fp32
    master weights under bf16 compute, CPU offload) on a single device."""
    info = env_info()
    if info.world_size == 1 and not fsdp_alone:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
            kwargs["device_id"] = torch.device("cuda", info.local_rank)
        if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
            # Not under torchrun: an in-memory store needs no address or port.
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend, **kwargs)
    info = env_info()
    return DistInfo(info.rank, info.world_size, info.local_rank, fsdp_alone=fsdp_alone)


# ---- sharding ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardingSettings:
    param_dtype: torch.dtype | None  # compute dtype of gathered params; None keeps storage's
    reduce_dtype: torch.dtype | None  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # False: keep layers gathered until backward (ZeRO-2)
    cpu_offload: bool = False  # sharded params, grads and optimizer state live on the CPU


class ShardedRoot(nn.Module):
    """The FSDP root: every training and sampling pass runs *inside* its ``forward``.

    The engine does not call the HF model's own forward (it runs the backbone and a
    chunked LM head that reads ``lm_head.weight`` directly), so wrapping the HF model
    itself as the root would leave the root group (embeddings, tied LM head, final
    norm, vision patch embed and merger) sharded. Routing each pass through this
    module's forward makes FSDP gather them for the pass and reduce-scatter their
    gradients after backward, with its own hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)


def _fsdp_modules(root: nn.Module) -> list[FSDPModule]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def shard_model(
    model: nn.Module, hf_model: VLModel, device: torch.device, settings: ShardingSettings
) -> ShardedRoot:
    """``fully_shard`` each vision block and decoder layer, then the root (bottom-up)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()
    layer_mp = MixedPrecisionPolicy(settings.param_dtype, settings.reduce_dtype)
    backbone = hf_model.model
    for block in [*backbone.visual.blocks, *backbone.language_model.layers]:
        fully_shard(
            block,
            mesh=mesh,
            reshard_after_forward=settings.reshard_after_forward,
            mp_policy=layer_mp,
            offload_policy=offload,
        )
    root = ShardedRoot(model)
    # The root's inputs include the loss weights: casting them to bf16 would round them.
    root_mp = MixedPrecisionPolicy(
        settings.param_dtype, settings.reduce_dtype, cast_forward_inputs=False
    )
    fully_shard(
        root, mesh=mesh, reshard_after_forward=False, mp_policy=root_mp, offload_policy=offload
    )
    for module in _fsdp_modules(root):
        # Sum, not average, over ranks (see the module docstring); a plain SUM also
        # works on gloo, which has neither AVG nor PREMUL_SUM.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return root


def shard_and_load(
    model: nn.Module,
    hf_model: VLModel,
    device: torch.device,
    compute_dtype: torch.dtype,
    *,
    reduce_bf16: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
) -> ShardedRoot:
    """Shard ``model`` (built on rank 0, on the meta device elsewhere) and fill every
    rank's shards from rank 0's weights. Collective."""
    mixed = compute_dtype != torch.float32
    settings = ShardingSettings(
        # fp32 shards; gathered in the compute dtype for forward and backward.
        param_dtype=compute_dtype if mixed else None,
        # gloo (CPU) reduces in fp32 only.
        reduce_dtype=torch.bfloat16 if reduce_bf16 and device.type == "cuda" else torch.float32,
        reshard_after_forward=reshard_after_forward,
        cpu_offload=cpu_offload,
    )
    # Rank 0's full weights, kept (by reference) past sharding to broadcast them.
    full = model.state_dict() if dist.get_rank() == 0 else {}
    root = shard_model(model, hf_model, device, settings)
    materialize_from_main(root, model, full, device, cpu_offload)
    return root


def materialize_from_main(
    root: nn.Module,
    model: nn.Module,
    full_state_dict: dict[str, torch.Tensor],
    device: torch.device,
    cpu_offload: bool,
) -> None:
    """Fill every rank's shards from rank 0's full weights. Collective.

    Ranks other than 0 built ``model`` on the meta device (no weights read), so only
    rank 0 ever holds the whole model, in host memory, and only until this returns.
    Each tensor goes out by broadcast and every rank keeps its own shard of it.
    Buffers (e.g. rotary ``inv_freq``, not in the state dict) are broadcast too.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in root.parameters()) or any(t.is_meta for t in root.buffers()):
        # Sharded parameters live in host memory under CPU offload; buffers never do.
        root.to_empty(device=torch.device("cpu") if cpu_offload else device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    # torch annotates the state dict as an invariant dict of its ValueType union
    set_model_state_dict(model, full_state_dict, options=options)  # type: ignore[arg-type]
    for module in root.modules():
        for name, buf in module.named_buffers(recurse=False):
            on_device = buf.to(device)
            dist.broadcast(on_device, src=0)
            setattr(module, name, on_device)  # a registered buffer stays registered


def reshard_all(root: nn.Module) -> None:
    """Free gathered parameters after a pass that had no backward (eval, sampling).

    The root keeps its parameters gathered after forward (for the backward that
    usually follows); without a backward they would stay gathered, and a state dict
    taken then would hold full tensors instead of shards.
    """
    for module in _fsdp_modules(root):
        module.reshard()


# ---- data split -------------------------------------------------------------------------
def assign_to_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Deterministic, token-balanced split: longest first, each to the least-loaded rank.

    Ties go to the lowest rank; each rank's indices come back in input order.
    """
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += lengths[i]
    return [sorted(s) for s in shares]


def plan_rank_groups(
    lengths: Sequence[int],
    world_size: int,
    rank: int,
    *,
    packing: bool,
    micro_batch_size: int,
    max_row_tokens: int,
) -> tuple[list[list[int]], int]:
    """This rank's micro-batches (lists of datum indices) and how many zero-weight
    micro-batches it must add so that every rank runs the same number.

    Each rank packs (or chunks) only its own share, so N ranks run N rows at once
    instead of one rank running the single packed row of a small step.
    """

    def groups_of(share: list[int]) -> list[list[int]]:
        if packing:
            rows = pack_rows([lengths[i] for i in share], max_row_tokens)
            return [[share[j] for j in row] for row in rows]
        mb = max(1, micro_batch_size)
        return [share[k : k + mb] for k in range(0, len(share), mb)]

    all_groups = [groups_of(share) for share in assign_to_ranks(lengths, world_size)]
    n_max = max(len(g) for g in all_groups)
    return all_groups[rank], n_max - len(all_groups[rank])


def zero_weight_copy(datum: Datum) -> Datum:
    """``datum`` with every loss input but the targets zeroed: it runs and counts for nothing."""
    inputs = {
        k: v if k == "target_tokens" else TensorData(data=[0.0] * len(v.data), dtype=v.dtype)
        for k, v in datum.loss_fn_inputs.items()
    }
    return Datum(model_input=datum.model_input, loss_fn_inputs=inputs)


def blank_image_term(backbone: VLBackbone, spatial_merge: int, dtype: torch.dtype) -> torch.Tensor:
    """0 x the vision tower's output on the smallest blank image (one merged token).

    Under FSDP the vision blocks all-gather in their forward, so a rank whose
    micro-batch has no image must still run the tower when another rank's has one;
    adding this zero where image features enter keeps its (zero) gradients flowing
    to the same parameters on every rank, so the reduce-scatters match too.
    """
    vc = backbone.config.vision_config
    device = backbone.get_input_embeddings().weight.device
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    m = spatial_merge
    pixels = torch.zeros(m * m, patch_dim, dtype=dtype, device=device)
    grid = torch.tensor([[1, m, m]], device=device)
    out = backbone.get_image_features(pixels, grid, return_dict=True)
    parts = [*out.pooler_output, *(t for feats in out.deepstack_features for t in feats)]
    return sum(t.float().sum() for t in parts) * 0.0


def gather_outputs(
    per_datum: list[torch.Tensor | None],
    metrics: dict[str, V],
    local: list[int],
    merge: Callable[[dict[str, V], dict[str, V]], None],
) -> tuple[list[torch.Tensor | None], dict[str, V]]:
    """Every rank's per-datum logprobs (CPU copies) and merged metrics, on every rank.

    ``merge(into, theirs)`` folds one rank's metrics in; they travel as given, so metrics
    that keep their counts (``dispatch.MetricTotals``) merge into the exact mean.
    """
    mine: dict[int, torch.Tensor] = {}
    for i in local:
        lp = per_datum[i]
        assert lp is not None  # this rank computed every datum in ``local``
        mine[i] = lp.detach().float().cpu()
    merged: dict[str, V] = {}
    for their_lps, their_metrics in all_gather_objects((mine, metrics)):
        for i, lp in their_lps.items():
            if per_datum[i] is None:
                per_datum[i] = lp
        merge(merged, their_metrics)
    return per_datum, merged


# ---- collectives ------------------------------------------------------------------------
def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (picklable Python objects)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    box: list[Any] = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    received: T = box[0]  # rank 0's, filled in place on every other rank
    return received


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum the trainable gradients over all ranks, in one flat bucket (replicated DDP).

    Each rank's gradient is its share of the global loss, so the sum is exactly the
    one-process gradient, as FSDP2's summed reduce-scatter gives for sharded runs. A
    parameter no pass reached on some rank (no image there) counts as zero.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def total_norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a float; under FSDP ``clip_grad_norm_`` returns a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ---- weights ----------------------------------------------------------------------------
def full_state_dict_on_main(
    model: nn.Module,
    trainable_only: bool,
    *,
    drop: Sequence[str] = (),
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on the CPU of rank 0 (an empty dict elsewhere), without
    the ``drop`` names (e.g. second names of tied weights), floating tensors cast to
    ``dtype`` if given. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    # torch types the result with its generic ValueType union; a model's are all tensors.
    full = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    for name in drop:
        full.pop(name, None)
    if dtype is not None:
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    return full
