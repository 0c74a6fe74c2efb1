"""How a global batch is split over ranks (pure functions; no process group)."""

from __future__ import annotations

import pytest

from vlmtune.engine.distributed import assign_to_ranks, plan_rank_groups, zero_weight_copy
from vlmtune.sdk import datum_from_tokens_weights


def test_split_is_deterministic_balanced_and_complete():
    lengths = [50, 10, 40, 30, 20, 60, 5]
    shares = assign_to_ranks(lengths, 3)
    assert shares == assign_to_ranks(lengths, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(lengths)
    assert all(s == sorted(s) for s in shares)


@pytest.mark.parametrize("packing", [True, False])
def test_every_rank_runs_the_same_number_of_micro_batches(packing):
    lengths = [100, 90, 10, 10, 10]  # an uneven step: rank 1 gets less to do
    counts = set()
    for rank in range(2):
        groups, n_pad = plan_rank_groups(
            lengths, 2, rank, packing=packing, micro_batch_size=1, max_row_tokens=128
        )
        counts.add(len(groups) + n_pad)
    assert len(counts) == 1


def test_more_ranks_than_examples_pads_the_idle_ones():
    groups, n_pad = plan_rank_groups([7], 4, 3, packing=True, micro_batch_size=1, max_row_tokens=64)
    assert groups == [] and n_pad == 1


def test_padding_copies_count_for_nothing():
    datum = datum_from_tokens_weights([1, 2, 3, 4], [0, 1, 1, 1])
    pad = zero_weight_copy(datum)
    assert pad.loss_fn_inputs["weights"].data == [0.0, 0.0, 0.0]
    assert pad.loss_fn_inputs["target_tokens"].data == datum.loss_fn_inputs["target_tokens"].data
