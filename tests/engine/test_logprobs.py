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
