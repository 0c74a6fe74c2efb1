"""The MoE tiny (Qwen3VLMoeForConditionalGeneration): the 30B-A3B / 235B-A22B code path.

Fused 3-D expert weights and a bare-parameter router: full fine-tuning trains them,
LoRA (nn.Linear only) adapts attention alone, and the planner counts both exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assistant, image_part, user
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.models.adapters import LoraSettings
from vlmtune.models.loading import ModelRequest, load_model, trainable_parameter_count
from vlmtune.models.registry import get_model_spec
from vlmtune.planning.memory import dims_for, estimate_memory
from vlmtune.render import datum_from_rendered
from vlmtune.types import AdamParams


def test_tiny_moe_is_a_real_qwen3_vl_moe_with_the_registry_counts():
    loaded = load_model("tiny-qwen3-vl-moe")
    assert type(loaded.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    mlp = loaded.model.model.language_model.layers[0].mlp
    assert mlp.experts.gate_up_proj.shape == (4, 2 * 128, 128)
    spec = get_model_spec("tiny-moe")
    assert spec.is_moe and loaded.spec == spec
    assert trainable_parameter_count(loaded.model)[1] == spec.params
    experts = sum(p.numel() for n, p in loaded.model.named_parameters() if ".experts." in n)
    assert spec.active_params == spec.params - experts // 2  # 2 of 4 experts per token
    assert dims_for("tiny-moe").total_params == pytest.approx(spec.params, rel=1e-3)


def test_lora_on_moe_adapts_attention_only_and_the_planner_counts_it():
    loaded = load_model(ModelRequest("tiny-moe", mode="lora", lora=LoraSettings(r=16)))
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all(".self_attn." in n and ".lora_" in n for n in trainable)
    assert trainable_parameter_count(loaded.model)[0] == dims_for("tiny-moe").lora_params(16)
    est = estimate_memory(dims_for("tiny-moe"), mode="lora", context=512, device="cpu")
    assert any("attention only" in note for note in est.notes)


def test_full_finetuning_trains_the_experts_and_the_router():
    engine = TrainingEngine(
        EngineConfig(base_model="tiny-moe", mode="full", freeze_embeddings=True, device="cpu")
    )
    rendered = engine.renderer.render(
        [user(image_part(64, 32, 0), "What digit is this?"), assistant("7")]
    )
    datum = datum_from_rendered(rendered, engine.image_token_id)
    mlp = engine.backbone.language_model.layers[0].mlp
    losses = []
    for _ in range(4):
        out = engine.forward_backward([datum])
        losses.append(out.metrics["loss:sum"])
        assert mlp.experts.gate_up_proj.grad.abs().sum() > 0
        assert mlp.experts.down_proj.grad.abs().sum() > 0
        assert mlp.gate.weight.grad.abs().sum() > 0
        engine.optim_step(AdamParams(learning_rate=1e-3))
    assert losses[-1] < losses[0] * 0.8, losses
    assert torch.isfinite(torch.tensor(losses)).all()
