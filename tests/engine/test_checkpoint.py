"""Training checkpoints hold what trains, once: LoRA ones no frozen base weight (the tied
embedding / LM head above all), full fine-tuning ones the tied weight under one name;
both resume on the same curve. A LoRA ``final/`` loads with transformers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assistant, image_part, user
from vlmtune.engine.checkpoint import DCP_DIR
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.render import datum_from_rendered
from vlmtune.sdk import AdamParams

ADAM = AdamParams(learning_rate=1e-2)
MB = 1e6


def _datums(engine: TrainingEngine) -> list:
    convs = [
        [user(image_part(64, 32, seed), "What digit is this?"), assistant(str(seed))]
        for seed in range(2)
    ]
    return [datum_from_rendered(engine.renderer.render(c), engine.image_token_id) for c in convs]


def _train(engine: TrainingEngine, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        out = engine.forward_backward(_datums(engine))
        engine.optim_step(ADAM)
        losses.append(out.metrics["loss:sum"])
    return losses


def _saved_keys(step_dir: Path) -> dict[str, int]:
    """Every tensor in a DCP checkpoint, by key, with its size in bytes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(step_dir / DCP_DIR)).read_metadata().state_dict_metadata
    return {
        key: m.size.numel() * m.properties.dtype.itemsize
        for key, m in metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _names(engine: TrainingEngine, trainable: bool) -> set[str]:
    return {
        n
        for n, p in engine.model.named_parameters(remove_duplicate=False)
        if p.requires_grad == trainable
    }


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    """A LoRA engine trained 2 steps, checkpointed, trained 2 more: (dir, engine, losses)."""
    root = tmp_path_factory.mktemp("lora")
    engine = TrainingEngine(EngineConfig(base_model=str(tiny_dir), mode="lora", lora_rank=4))
    losses = _train(engine, 2)
    engine.save_state(root / "step-2", extra={"epoch": 0})
    losses += _train(engine, 2)
    return root, engine, losses


def test_lora_checkpoint_holds_only_the_adapter_and_its_optimizer_state(lora_run):
    root, engine, _ = lora_run
    saved = _saved_keys(root / "step-2")
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys == _names(engine, trainable=True)
    assert all("lora_" in k for k in model_keys)
    assert not any(k.endswith(("lm_head.weight", "embed_tokens.weight")) for k in saved)
    # Adam keeps two moments per trained weight: the checkpoint is three adapters' worth.
    adapter_bytes = sum(p.numel() * 4 for p in engine.model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * 4 for p in engine.model.parameters() if not p.requires_grad)
    assert sum(saved.values()) == pytest.approx(3 * adapter_bytes, rel=0.01)
    # On disk DCP adds ~2 kB per tensor; the frozen weights (~80 MB) would dwarf that.
    assert _dir_bytes(root / "step-2") < 2 * MB < frozen_bytes / 40


def test_lora_checkpoint_resumes_on_the_same_curve(lora_run, tiny_dir):
    root, _, losses = lora_run
    resumed = TrainingEngine(EngineConfig(base_model=str(tiny_dir), mode="lora", lora_rank=4))
    assert resumed.load_state(root / "step-2") == {"epoch": 0}
    assert resumed.step == 2
    assert _train(resumed, 2) == pytest.approx(losses[2:], rel=1e-5)


def test_lora_final_dir_is_the_adapter_and_loads_with_transformers_alone(lora_run, tiny_dir):
    from transformers import AutoModelForImageTextToText

    root, engine, _ = lora_run
    final = engine.save_weights_for_sampler(root / "final")
    assert json.loads((final / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_dir.resolve())
    assert not (final / "model.safetensors").exists()
    assert _dir_bytes(final) < 0.5 * MB  # the adapter (~0.2 MB) and processor files

    # transformers' peft integration reads the base from adapter_config.json.
    model = AutoModelForImageTextToText.from_pretrained(final, local_files_only=True)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    ids = torch.tensor([[151644, 872, 198, 40, 151645]])
    with torch.no_grad():
        expected = engine.model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        # ... and applied the adapter: the base alone is far off.
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-2


def test_full_finetuning_checkpoint_saves_the_tied_weight_once(tiny_dir, tmp_path):
    """The frozen vision tower stays out; the tied embedding / LM head is saved under its
    first name and comes back into both."""
    engine = TrainingEngine(EngineConfig(base_model=str(tiny_dir), mode="full"))
    losses = _train(engine, 1)
    engine.save_state(tmp_path / "step-1")
    losses += _train(engine, 1)
    saved = _saved_keys(tmp_path / "step-1")
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert "model.language_model.embed_tokens.weight" in model_keys
    assert "lm_head.weight" not in model_keys
    assert not any(k.startswith("model.visual.") for k in model_keys)
    assert model_keys == _names(engine, trainable=True) - {"lm_head.weight"}

    resumed = TrainingEngine(EngineConfig(base_model=str(tiny_dir), mode="full"))
    resumed.load_state(tmp_path / "step-1")
    hf = resumed.hf_model
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    assert _train(resumed, 1) == pytest.approx(losses[1:], rel=1e-5)
