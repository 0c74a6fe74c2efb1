"""A call's datums -> this process's micro-batches (packed rows or padded groups)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vlmtune.engine import distributed as dist_utils
from vlmtune.engine.batching import Batch, packing_efficiency
from vlmtune.types import Datum

# (datum indices, collated batch, is_padding) for each micro-batch.
MicroBatch = tuple[list[int], Batch, bool]
Collate = Callable[[Sequence[Datum], list[list[int]] | None], Batch]


def plan_micro_batches(
    datums: Sequence[Datum],
    collate: Collate,
    *,
    world_size: int,
    rank: int,
    packing: bool,
    micro_batch_size: int,
    max_row_tokens: int,
) -> tuple[list[MicroBatch], float | None]:
    """This rank's micro-batches, and the packing efficiency of its rows (None: unpacked).

    Packed: each row of up to ``max_row_tokens`` is one micro-batch; otherwise
    ``micro_batch_size`` examples, right-padded. Under torchrun each rank takes its
    share of the global batch, plus zero-weight copies of the shortest datum so that
    every rank runs as many forward/backward passes as the busiest one (FSDP's
    collectives and the replicated all-reduce both need every rank to take part).
    """
    lengths = [d.model_input.length for d in datums]
    groups, n_pad = dist_utils.plan_rank_groups(
        lengths,
        world_size,
        rank,
        packing=packing,
        micro_batch_size=micro_batch_size,
        max_row_tokens=max_row_tokens,
    )
    efficiency = None
    if packing and groups:
        packed = [lengths[i] for g in groups for i in g]
        efficiency = packing_efficiency(packed, groups, max_row_tokens)

    def rows(n: int) -> list[list[int]] | None:
        return [list(range(n))] if packing else None

    out: list[MicroBatch] = [
        (g, collate([datums[i] for i in g], rows(len(g))), False) for g in groups
    ]
    if n_pad:
        shortest = min(range(len(datums)), key=lambda i: (lengths[i], i))
        pad = collate([dist_utils.zero_weight_copy(datums[shortest])], rows(1))
        out += [([], pad, True)] * n_pad
    return out, efficiency
