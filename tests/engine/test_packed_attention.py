"""Packed rows attend per example (models/packed_attention.py): no T x T mask, and the
same numbers as a block-diagonal mask (or each example alone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import assistant, image_part, user
from vlmtune.engine.batching import segment_bounds
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.engine.forward import packed_attention_kwargs
from vlmtune.models.packed_attention import (
    PACKED_ATTENTION,
    cu_seqlens_from_positions,
    flash_varlen_attention,
    packed_attention_forward,
    packed_attention_mask,
    per_segment_sdpa,
)
from vlmtune.render import datum_from_rendered
from vlmtune.sdk import datum_from_tokens_weights

TOL = {"atol": 1e-5, "rtol": 1e-5}


class _Attn(torch.nn.Module):
    """What transformers' attention functions read from the calling module."""

    is_causal = True

    def __init__(self, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_key_value_groups = heads // kv_heads


def _qkv(B=2, H=4, K=2, T=23, D=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, K, K))
    return [x.to(device, dtype).requires_grad_(True) for x in (q, k, v)]


def _block_diagonal_reference(q, k, v, bounds):
    """Dense (B, 1, T, T) block-diagonal causal mask over the flattened B*T tokens."""
    B, H, T, _ = q.shape
    seg = torch.zeros(B * T, dtype=torch.long)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
        seg[s:e] = i
    seg_B_T = seg.view(B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg_B_T[:, :, None] == seg_B_T[:, None, :]) & causal
    rep = H // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask[:, None]
    )
    return out.transpose(1, 2)  # (B, T, H, D), as transformers' functions return


def test_cu_seqlens_from_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert cu_seqlens_from_positions(positions).tolist() == [0, 3, 5, 9, 15, 18]
    # one example per row: nothing packed, plain causal attention does
    assert cu_seqlens_from_positions(torch.arange(6).expand(2, 6)) is None


def test_segment_bounds_cover_every_token_padding_included():
    # row 0: examples of 3 and 4 tokens, then 3 of padding; row 1: one example of 10
    assert segment_bounds([(0, 0, 3), (0, 3, 4), (1, 0, 10)], 2, 10) == [0, 3, 7, 10, 20]


@pytest.mark.parametrize("B", [1, 2])
def test_per_segment_sdpa_equals_block_diagonal_mask_values_and_grads(B):
    q, k, v = _qkv(B=B, T=23)
    bounds = [0, 5, 6, 17, 23] if B == 1 else [0, 5, 6, 17, 23, 30, 46]
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = per_segment_sdpa(q, k, v, cu, scaling=None, dropout=0.0, causal=True)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    want = _block_diagonal_reference(q, k, v, bounds)
    want_grads = torch.autograd.grad((want * upstream).sum(), (q, k, v))
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_segments_come_from_positions_when_no_cu_seqlens_is_given():
    q, k, v = _qkv(B=1, T=12)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    module = _Attn(4, 2)
    derived, _ = packed_attention_forward(module, q, k, v, None, position_ids=positions)
    want = _block_diagonal_reference(q, k, v, [0, 4, 7, 12])
    torch.testing.assert_close(derived, want, **TOL)
    # no restart: plain causal SDPA, the same as one segment
    plain, _ = packed_attention_forward(module, q, k, v, None, position_ids=torch.arange(12)[None])
    torch.testing.assert_close(plain, _block_diagonal_reference(q, k, v, [0, 12]), **TOL)


def test_mask_function_builds_nothing_without_padding_and_defers_with_it():
    args = {"batch_size": 1, "q_length": 4096, "kv_length": 4096}
    assert packed_attention_mask(**args, attention_mask=None) is None
    padding = torch.tensor([[True, True, False]])
    mask = packed_attention_mask(
        batch_size=1, q_length=3, kv_length=3, attention_mask=padding, device="cpu"
    )
    assert mask is not None and mask.shape == (1, 1, 3, 3)  # SDPA's own padded mask


class _LargestSquare(TorchDispatchMode):
    """Records every op output whose last two dimensions are (T, T)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = T
        self.hits: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2:] == (self.T, self.T):
                self.hits.append((str(func), tuple(t.shape)))
        return out


def _text_rows(engine, lengths):
    g = torch.Generator().manual_seed(0)
    datums = []
    for n in lengths:  # n + 1 tokens: n inputs, n targets
        tokens = torch.randint(0, 1000, (n + 1,), generator=g).tolist()
        datums.append(datum_from_tokens_weights(tokens, [1.0] * (n + 1)))
    return engine.collate(datums, [list(range(len(datums)))])


@pytest.fixture(scope="module")
def packed_engine(tiny_dir):
    return TrainingEngine(
        EngineConfig(base_model=str(tiny_dir), mode="full", packing=True, max_row_tokens=4096)
    )


def test_packed_row_never_materialises_a_T_by_T_tensor(packed_engine, tiny_dir):
    """The engine's packed forward and backward, watched op by op: no (T, T) tensor.
    The same row through transformers' plain SDPA does build one (the spy works)."""
    engine = packed_engine
    assert engine.backbone.language_model.config._attn_implementation == PACKED_ATTENTION
    batch = _text_rows(engine, [150, 40, 300, 97, 213])
    T = batch.input_ids_B_T.shape[1]
    assert batch.packed and T == 800
    kwargs = packed_attention_kwargs(batch)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 150, 190, 490, 587, 800]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["max_length_q"] == 300
    with _LargestSquare(T) as spy:
        hidden = engine._forward.hidden_states(batch)
        hidden.square().sum().backward()
    engine.model.zero_grad(set_to_none=True)
    assert spy.hits == []

    plain = TrainingEngine(
        EngineConfig(base_model=str(tiny_dir), mode="full", packing=True, max_row_tokens=4096)
    )
    plain.hf_model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad(), _LargestSquare(T) as spy:
        plain_hidden = plain._forward.hidden_states(batch)
    assert spy.hits, "transformers' SDPA path was expected to build a T x T mask"
    # Values are compared with each example run alone in the next test (and in
    # test_packing.py), not with this engine: in one clean-clone run the fresh engine's
    # hidden states differed by 2e-3 where every local run agreed to 1e-5 (open in issue 16).
    assert plain_hidden.shape == hidden.shape


def test_two_packed_rows_with_padding_equal_each_example_alone(packed_engine):
    engine = packed_engine
    convs = [
        [user(image_part(64, 32, 1), "What digit is this?"), assistant("3")],
        [user("no image here"), assistant("plain text answer")],
        [user(image_part(96, 64, 3), "a longer question about the picture"), assistant("two")],
    ]
    datums = [datum_from_rendered(engine.renderer.render(c), engine.image_token_id) for c in convs]
    with torch.no_grad():
        batch = engine.collate(datums, [[0, 1], [2]])  # row 1 shorter: padded
        assert batch.input_ids_B_T.shape[0] == 2
        hidden = engine._forward.hidden_states(batch)
        for i, (row, start, n) in enumerate(batch.segments):
            alone = engine._forward.hidden_states(engine.collate([datums[i]], None))
            torch.testing.assert_close(hidden[row, start : start + n], alone[0, :n], **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_agrees_with_per_segment_sdpa_on_cuda():
    pytest.importorskip("flash_attn")
    q, k, v = _qkv(B=2, H=8, K=2, T=300, D=64, dtype=torch.bfloat16, device="cuda")
    bounds = [0, 37, 38, 250, 300, 420, 600]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    got = flash_varlen_attention(q, k, v, cu, None, scaling=None, dropout=0.0, causal=True)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    want = per_segment_sdpa(q, k, v, cu, scaling=None, dropout=0.0, causal=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), (q, k, v))
    bf16 = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **bf16)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **bf16)
