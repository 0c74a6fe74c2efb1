"""The loss path never builds full-vocabulary logits for a whole row."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from vlmtune.engine.engine import EngineConfig, TrainingEngine
    from vlmtune.models.tiny import tiny_model_dir
    from vlmtune.sdk import datum_from_tokens_weights

    T = 2048
    frozen = sys.argv[1] == "frozen"
    eng = TrainingEngine(EngineConfig(base_model=str(tiny_model_dir()), mode="full", freeze_embeddings=frozen))
    tokens = torch.randint(0, 700, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    datum = datum_from_tokens_weights(tokens, [1.0] * T)
    eng.forward([datum])  # warm-up: allocator pools, lazily built modules
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    eng.forward_backward([datum])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base)
    """
)


@pytest.mark.parametrize(("head", "limit_mib"), [("frozen", 200), ("trainable", 200)])
def test_peak_memory_of_a_long_fully_weighted_row_is_bounded(head, limit_mib):
    """2,048 weighted positions x 151,936 vocabulary: fp32 logits alone would be 1,187 MiB
    (and their log-softmax and gradient as much again each). Both heads run through one
    reused 32 MiB (chunk, V) block and must add less than 200 MiB of peak RSS for
    forward + backward. A trainable head (``_TrainableHeadLogprobs``) adds its one dense
    (V, H) weight gradient: measured ~55 MiB (plain autograd over checkpointed chunks,
    before it: ~450 MiB). A frozen head makes its gradient in forward: measured ~0
    above the warm-up forward, which already held that block."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, head], check=True, capture_output=True, text=True
    )
    delta_mib = float(out.stdout.strip().splitlines()[-1])
    assert delta_mib < limit_mib, f"peak RSS grew by {delta_mib:.0f} MiB"
