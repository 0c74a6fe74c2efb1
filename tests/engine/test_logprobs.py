import pytest
import torch

from vlmtune.engine import logprobs as logprobs_mod
from vlmtune.engine.logprobs import full_logits_token_logprobs, selected_token_logprobs


def _reference(hidden, head, targets, weights):
    """Log-probs and gradients by autograd through the full (N, V) logits."""
    hidden = hidden.detach().requires_grad_(True)
    lp = full_logits_token_logprobs(head(hidden).unsqueeze(0), targets.unsqueeze(0))[0]
    params = [p for p in head.parameters() if p.requires_grad]
    grads = torch.autograd.grad((lp * weights).sum(), [hidden, *params])
    return lp.detach(), grads


@pytest.mark.parametrize("with_bias", [False, True])
def test_trainable_head_logprobs_and_grads_match_full_logits(with_bias):
    """A trainable head (full fine-tuning, tied embedding trained) takes
    ``_TrainableHeadLogprobs``: log-probs and the gradients of the hidden states, the
    weight and the bias equal autograd through full logits, over several chunks."""
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=with_bias)
    targets = torch.randint(0, V, (N,))
    weights = torch.linspace(-1, 1, N)

    lp = selected_token_logprobs(hidden, head, targets, chunk_tokens=8)
    assert "TrainableHead" in type(lp.grad_fn).__name__
    got = torch.autograd.grad((lp * weights).sum(), [hidden, *head.parameters()])

    lp_full, expected = _reference(hidden, head, targets, weights)
    torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=1e-5)
    assert len(got) == len(expected) == (3 if with_bias else 2)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_trainable_head_keeps_no_vocabulary_sized_tensor_but_its_weight():
    """Backward recomputes each chunk's softmax: what forward saves is the hidden
    states, the weight itself and the targets, no (chunk, V) block of logits."""
    N, H, V = 64, 8, 5000
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selected_token_logprobs(hidden, head, torch.randint(0, V, (N,)), chunk_tokens=16)
    big = [t for t in saved if V in t.shape]
    assert len(big) == 1 and big[0] is head.weight, [t.shape for t in saved]


@pytest.mark.parametrize("checkpointed", [True, False])
def test_autograd_chunks_match_full_logits(monkeypatch, checkpointed):
    """The plain autograd path (FSDP's sharded weights; no-grad evaluation)."""
    monkeypatch.setattr(logprobs_mod, "CHECKPOINT_MIN_LOGITS", 0 if checkpointed else 10**12)
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (N,))
    weights = torch.linspace(0, 1, N)

    lp = logprobs_mod._chunked_logprobs(hidden, head.weight, None, targets, 8, needs_grad=True)
    got = torch.autograd.grad((lp * weights).sum(), [hidden, head.weight])

    lp_full, expected = _reference(hidden, head, targets, weights)
    torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("trainable", [False, True])
def test_head_in_bf16_stays_close_to_fp32(trainable):
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
        head.weight.requires_grad_(trainable)
        lp = selected_token_logprobs(hidden, head, targets, chunk_tokens=8)
        lp.sum().backward()
        assert lp.dtype == torch.float32 and hidden.grad.dtype == dtype
        out[dtype] = (lp.detach(), hidden.grad.float())
        if trainable:
            assert head.weight.grad.dtype == dtype
            out[dtype] += (head.weight.grad.float(),)
    for a, b in zip(out[torch.bfloat16], out[torch.float32], strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
