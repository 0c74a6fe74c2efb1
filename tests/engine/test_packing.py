"""Packing: several examples in one row must behave exactly like each example alone."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assistant, image_part, user
from vlmtune.engine.batching import pack_rows, packing_efficiency
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.render import datum_from_rendered

# fp32 on CPU: a packed row and separate rows differ only by summation order.
TOL = {"atol": 1e-4, "rtol": 1e-4}


def test_pack_rows_first_fit_decreasing_by_hand():
    """lengths [5, 3, 8, 2, 4], capacity 10: 8 -> row0 (2 left); 5 -> row1 (5 left);
    4 -> row1 (1 left); 3 -> row2 (7 left); 2 -> row0 (0 left)."""
    rows = pack_rows([5, 3, 8, 2, 4], 10)
    assert rows == [[2, 3], [0, 4], [1]]
    assert packing_efficiency([5, 3, 8, 2, 4], rows, 10) == pytest.approx(22 / 30)


def test_pack_rows_never_splits_and_keeps_oversize_alone():
    rows = pack_rows([12, 4, 4], 10)
    assert sorted(map(sorted, rows)) == [[0], [1, 2]]


@pytest.fixture(scope="module")
def engines(tiny_dir):
    cfg = dict(
        base_model=str(tiny_dir), mode="full", freeze_vision_tower=False, freeze_projector=False
    )
    plain = TrainingEngine(EngineConfig(**cfg))
    packed = TrainingEngine(
        EngineConfig(**cfg, packing=True, max_row_tokens=4096), loaded=plain.loaded
    )
    return plain, packed


def examples(engine):
    convs = [
        [user(image_part(64, 32, 1), "What digit is this?"), assistant("3")],
        [user("no image here"), assistant("plain text answer")],
        [
            user(image_part(32, 32, 2), "first"),
            assistant("one"),
            user(image_part(96, 64, 3), "second"),
            assistant("two"),
        ],
    ]
    return [datum_from_rendered(engine.renderer.render(c), engine.image_token_id) for c in convs]


def test_packed_row_logprobs_equal_each_example_alone(engines):
    plain, packed = engines
    datums = examples(plain)
    together = packed.forward(datums)
    assert together.metrics["packing_efficiency:mean"] == pytest.approx(
        sum(d.model_input.length for d in datums) / 4096
    )
    batch = packed._plan(datums)
    assert len(batch) == 1 and batch[0][1].packed  # all three in one row
    for datum, out in zip(datums, together.loss_fn_outputs, strict=True):
        alone = plain.forward([datum]).loss_fn_outputs[0]["logprobs"].to_torch()
        w = datum.loss_fn_inputs["weights"].to_torch() != 0
        torch.testing.assert_close(out["logprobs"].to_torch()[w], alone[w], **TOL)


def test_packed_step_gradients_equal_unpacked_micro_batches(engines):
    plain, packed = engines
    datums = examples(plain)
    params = [p for p in plain.model.parameters() if p.requires_grad]  # shared by both engines

    plain.forward_backward(datums)
    unpacked = [p.grad.clone() if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    packed.forward_backward(datums)
    for a, p in zip(unpacked, params, strict=True):
        if a is None:
            assert p.grad is None or not p.grad.any()
        else:  # fp32 summation-order noise, relative to each gradient's size
            assert (p.grad - a).norm() <= 1e-4 * a.norm() + 1e-6
    for p in params:
        p.grad = None
