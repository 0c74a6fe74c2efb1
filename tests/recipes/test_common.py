import pytest

from vlmtune.recipes.common import batch_indices, learning_rate_at, steps_per_epoch


def test_linear_warmup_then_linear_decay_by_hand():
    """10 steps, warmup_ratio 0.2 -> 2 warmup steps: lr = 0.5, 1.0, then decays over 8 steps:
    step 2 -> 1.0, step 6 -> 1 - 4/8 = 0.5, step 9 -> 1 - 7/8 = 0.125."""
    lrs = [learning_rate_at(s, 10, 1.0, 0.2, "linear") for s in range(10)]
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(0.125)


def test_cosine_and_constant():
    assert learning_rate_at(5, 10, 2.0, 0.0, "cosine") == pytest.approx(
        1.0
    )  # halfway: cos(pi/2) = 0
    assert learning_rate_at(7, 10, 2.0, 0.0, "constant") == 2.0


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
    n, bs = 10, 4
    assert steps_per_epoch(n, bs) == 3
    epoch0 = [i for s in range(3) for i in batch_indices(s, n, bs, seed=1)]
    epoch1 = [i for s in range(3, 6) for i in batch_indices(s, n, bs, seed=1)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert batch_indices(4, n, bs, seed=1) == batch_indices(4, n, bs, seed=1)
    assert len(batch_indices(2, n, bs, seed=1)) == 2  # short last batch
