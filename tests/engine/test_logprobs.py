import pytest
import torch

from vlmtune.engine import logprobs as logprobs_mod
from vlmtune.engine.logprobs import full_logits_token_logprobs, selected_token_logprobs


@pytest.mark.parametrize("checkpointed", [True, False])
def test_chunked_logprobs_and_grads_match_full_logits(monkeypatch, checkpointed):
    monkeypatch.setattr(logprobs_mod, "CHECKPOINT_MIN_LOGITS", 0 if checkpointed else 10**12)
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (N,))

    lp_chunked = selected_token_logprobs(hidden, head, targets, chunk_tokens=8)
    (lp_chunked * torch.linspace(0, 1, N)).sum().backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()

    hidden.grad = None
    head.weight.grad = None
    lp_full = full_logits_token_logprobs(head(hidden).unsqueeze(0), targets.unsqueeze(0))[0]
    (lp_full * torch.linspace(0, 1, N)).sum().backward()

    torch.testing.assert_close(lp_chunked, lp_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden, hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_head, head.weight.grad, atol=1e-5, rtol=1e-5)


def test_no_positions_gives_empty():
    head = torch.nn.Linear(4, 10, bias=False)
    out = selected_token_logprobs(torch.zeros(0, 4), head, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_gradient_made_in_forward_matches_full_logits(with_bias):
    """A frozen LM head (frozen tied embedding, LoRA) takes ``_FrozenHeadLogprobs``:
    log-probs and the hidden states' gradient equal autograd through full logits."""
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=with_bias).requires_grad_(False)
    targets = torch.randint(0, V, (N,))
    weights = torch.linspace(-1, 1, N)

    lp = selected_token_logprobs(hidden, head, targets, chunk_tokens=8)
    assert lp.grad_fn is not None and "FrozenHead" in type(lp.grad_fn).__name__
    (lp * weights).sum().backward()
    got = hidden.grad.clone()

    hidden.grad = None
    lp_full = full_logits_token_logprobs(head(hidden).unsqueeze(0), targets.unsqueeze(0))[0]
    (lp_full * weights).sum().backward()
    torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, hidden.grad, atol=1e-5, rtol=1e-5)


def test_frozen_head_keeps_no_vocabulary_sized_tensor_for_backward():
    """What backward holds is the (N, H) gradient, not a (chunk, V) block of logits."""
    N, H, V = 64, 8, 5000
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        selected_token_logprobs(hidden, head, torch.randint(0, V, (N,)), chunk_tokens=16)
    assert saved and all(V not in shape for shape in saved), saved


def test_frozen_head_in_bf16_stays_close_to_fp32():
    torch.manual_seed(0)
    N, H, V = 29, 32, 211
    hidden32 = torch.randn(N, H)
    head32 = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    targets = torch.randint(0, V, (N,))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden = hidden32.to(dtype).detach().requires_grad_(True)
        head = torch.nn.Linear(H, V, bias=False).to(dtype).requires_grad_(False)
        head.weight.copy_(head32.weight)
        lp = selected_token_logprobs(hidden, head, targets, chunk_tokens=8)
        lp.sum().backward()
        assert lp.dtype == torch.float32 and hidden.grad.dtype == dtype
        out[dtype] = (lp.detach(), hidden.grad.float())
    for a, b in zip(out[torch.bfloat16], out[torch.float32], strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
