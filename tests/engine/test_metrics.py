"""Metrics merged over micro-batches and ranks (``dispatch``): means are true means."""

from __future__ import annotations

import pytest

from vlmtune.engine import dispatch


def totals_of(*parts: dict[str, float]) -> dispatch.MetricTotals:
    totals: dispatch.MetricTotals = {}
    for p in parts:
        dispatch.add_metrics(totals, p)
    return totals


def test_mean_of_four_micro_batches_is_their_mean():
    """Means 1, 2, 3, 4 -> (1 + 2 + 3 + 4) / 4 = 2.5 (pairwise halving gave 3.125)."""
    totals = totals_of(*({"ratio:mean": v} for v in (1.0, 2.0, 3.0, 4.0)))
    assert totals == {"ratio:mean": (10.0, 4)}
    assert dispatch.final_metrics(totals) == {"ratio:mean": 2.5}


def test_sums_add_maxima_max_and_plain_names_are_means():
    """loss:sum 1.5 + 2.5 = 4; peak:max max(3, 7) = 7; acc (no suffix) (0 + 1) / 2 = 0.5."""
    totals = totals_of(
        {"loss:sum": 1.5, "peak:max": 3.0, "acc": 0.0},
        {"loss:sum": 2.5, "peak:max": 7.0, "acc": 1.0},
    )
    assert dispatch.final_metrics(totals) == {"loss:sum": 4.0, "peak:max": 7.0, "acc": 0.5}


def test_ranks_merge_into_the_mean_of_all_micro_batches():
    """Rank 0 ran micro-batches with means 1, 2, 3, rank 1 one with 4: the mean is 2.5,
    not the mean of the ranks' means (2 + 4) / 2 = 3. ``:sum`` adds across ranks: 6 + 4.
    The fold is ``distributed.gather_outputs``'s, with the merge the engine passes it."""
    rank0 = totals_of(*({"ratio:mean": v, "loss:sum": v} for v in (1.0, 2.0, 3.0)))
    rank1 = totals_of({"ratio:mean": 4.0, "loss:sum": 4.0})
    merged: dispatch.MetricTotals = {}
    for theirs in (rank0, rank1):
        dispatch.merge_metrics(merged, theirs)
    assert dispatch.final_metrics(merged) == {"ratio:mean": 2.5, "loss:sum": 10.0}
    # A rank that ran no micro-batch (all padding) sends no metrics and changes nothing.
    dispatch.merge_metrics(merged, {})
    assert dispatch.final_metrics(merged)["ratio:mean"] == pytest.approx(2.5)


def _gather_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from vlmtune.engine import distributed as dist_utils

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        means = [(1.0, 2.0, 3.0), (4.0,)][rank]
        totals = totals_of(*({"ratio:mean": v, "loss:sum": v} for v in means))
        local = [rank]  # each rank computed one datum's logprobs
        per_datum: list[torch.Tensor | None] = [None, None]
        per_datum[rank] = torch.tensor([float(rank)])
        lps, merged = dist_utils.gather_outputs(per_datum, totals, local, dispatch.merge_metrics)
        result = {"metrics": dispatch.final_metrics(merged), "lps": [t.tolist() for t in lps]}
        with open(f"{out_dir}/rank-{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s, mostly importing torch
def test_gather_outputs_over_two_gloo_ranks_gives_the_true_mean(tmp_path):
    """The same split as above through the real collective: both ranks read 2.5 and 10."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_gather_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert result["metrics"] == {"ratio:mean": 2.5, "loss:sum": 10.0}
        assert result["lps"] == [[0.0], [1.0]]
