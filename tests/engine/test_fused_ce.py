"""Fused linear cross-entropy (Liger / Cut Cross-Entropy) behind selected_token_logprobs.

The kernels are Triton/CUDA only. The CPU tests check the selection rules and the
adapter (sign, dtype, per-token gradients) against fake kernels with the same contract;
the ``gpu`` tests compare the real kernels with the chunked torch path and are skipped
where CUDA (or the optional package) is absent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmtune.engine import logprobs as lp_mod
from vlmtune.engine.logprobs import (
    full_logits_token_logprobs,
    fused_backend,
    fused_token_logprobs,
    selected_token_logprobs,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(n=53, h=32, v=997, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)
    head = torch.nn.Linear(h, v, bias=False).to(device, dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.2)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    # Non-uniform per-token upstream gradients: what reduction="none" must get right.
    upstream = torch.rand(n, generator=g).to(device)
    return hidden, head, targets, upstream


def _values_and_grads(fn, hidden, head, targets, upstream):
    hidden.grad = None
    head.weight.grad = None
    lp = fn(hidden, head, targets)
    (lp.float() * upstream).sum().backward()
    return lp.detach().float(), hidden.grad.float().clone(), head.weight.grad.float().clone()


def _fake_kernel(h, w, b, t):
    """The documented contract of both kernels: per-token -log p(target), fp32."""
    return F.cross_entropy(F.linear(h, w, b).float(), t, reduction="none")


def test_cpu_always_takes_the_chunked_path(monkeypatch) -> None:
    monkeypatch.setenv(lp_mod.FUSED_CE_ENV, "liger")  # even when asked for a kernel
    hidden, head, targets, _ = _problem()
    assert fused_backend(hidden, head.weight, None, needs_grad=True) is None
    got = selected_token_logprobs(hidden, head, targets)
    want = full_logits_token_logprobs(head(hidden).unsqueeze(0), targets.unsqueeze(0))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_setting_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(lp_mod.FUSED_CE_ENV, "fastest")
    hidden, head, _, _ = _problem()
    with pytest.raises(ValueError, match="VLMTUNE_FUSED_CE"):
        fused_backend(hidden, head.weight, None, needs_grad=False)


@pytest.mark.parametrize("backend", ["liger", "cce"])
def test_adapter_gives_logprobs_and_per_token_grads(monkeypatch, backend) -> None:
    monkeypatch.setattr(lp_mod, "_load_liger", lambda: (_fake_kernel, True))
    monkeypatch.setattr(lp_mod, "_load_cce", lambda: _fake_kernel)
    hidden, head, targets, upstream = _problem()
    fused = _values_and_grads(
        lambda h, m, t: fused_token_logprobs(backend, h, m.weight, m.bias, t),
        hidden, head, targets, upstream,
    )  # fmt: skip
    chunked = _values_and_grads(
        lambda h, m, t: selected_token_logprobs(h, m, t, chunk_tokens=8),
        hidden, head, targets, upstream,
    )  # fmt: skip
    assert fused[0].dtype == torch.float32 and (fused[0] <= 0).all()
    for a, b in zip(fused, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- real kernels (UNTESTED on the CPU-only development machines) ------------------
def _available(backend: str) -> bool:
    return (lp_mod._load_liger() if backend == "liger" else lp_mod._load_cce()) is not None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["liger", "cce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_chunked_path_on_cuda(backend, dtype) -> None:
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    hidden, head, targets, upstream = _problem(n=700, h=128, v=151_936, dtype=dtype, device="cuda")
    assert fused_backend(hidden, head.weight, None, True, preference=backend) == backend
    fused = _values_and_grads(
        lambda h, m, t: selected_token_logprobs(h, m, t, fused=backend),
        hidden, head, targets, upstream,
    )  # fmt: skip
    chunked = _values_and_grads(
        lambda h, m, t: selected_token_logprobs(h, m, t, fused="off"),
        hidden, head, targets, upstream,
    )  # fmt: skip
    # bf16: both paths round the logits to bf16 before an fp32 softmax; they differ in
    # summation order only.
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for a, b in zip(fused, chunked, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_a_kernel_and_the_engine_agrees(tiny_dir, monkeypatch) -> None:
    if not (_available("liger") or _available("cce")):
        pytest.skip("neither liger-kernel nor cut-cross-entropy is installed")
    from tests.conftest import assistant, image_part, user
    from vlmtune.engine.engine import EngineConfig, TrainingEngine
    from vlmtune.render import datum_from_rendered

    engine = TrainingEngine(
        EngineConfig(base_model=str(tiny_dir), mode="full", device="cuda", precision="fp32")
    )
    convs = [[user(image_part(64, 32, 1), "What digit is this?"), assistant("three")]]
    datums = [datum_from_rendered(engine.renderer.render(c), engine.image_token_id) for c in convs]
    outs = {}
    for setting in ("off", "auto"):
        monkeypatch.setenv(lp_mod.FUSED_CE_ENV, setting)
        engine.model.zero_grad(set_to_none=True)
        out = engine.forward_backward(datums)
        grad = engine.hf_model.lm_head.weight.grad
        outs[setting] = (out.loss_fn_outputs[0]["logprobs"].to_torch(), grad.clone())
    torch.testing.assert_close(outs["auto"][0], outs["off"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["auto"][1], outs["off"][1], atol=1e-5, rtol=1e-3)
