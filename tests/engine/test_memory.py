"""The loss path never builds full-vocabulary logits for a whole row."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import resource, torch
    from vlmtune.engine.engine import EngineConfig, TrainingEngine
    from vlmtune.models.tiny import tiny_model_dir
    from vlmtune.sdk import datum_from_tokens_weights

    T = 4096
    eng = TrainingEngine(EngineConfig(base_model=str(tiny_model_dir()), mode="full", freeze_embeddings=True))
    tokens = torch.randint(0, 700, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    datum = datum_from_tokens_weights(tokens, [1.0] * T)
    eng.forward([datum])  # warm-up: allocator pools, lazily built modules
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    eng.forward_backward([datum])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base)
    """
)


def test_peak_memory_of_a_long_fully_weighted_row_is_bounded():
    """4,096 weighted positions x 151,936 vocabulary: fp32 logits alone would be 2,374 MiB
    (and their log-softmax and gradient as much again each). The chunked path must add
    less than 1,200 MiB of peak RSS for forward + backward (measured: ~850 MiB, nearly
    all of it the chunk's logits, their softmax and gradient, independent of T)."""
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True)
    delta_mib = float(out.stdout.strip().splitlines()[-1])
    assert delta_mib < 1200, f"peak RSS grew by {delta_mib:.0f} MiB"
