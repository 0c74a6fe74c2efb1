"""Image prefetch in worker processes, and activation checkpointing of both towers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import assistant, image_part, png_bytes, user
from vlmtune.engine.engine import EngineConfig, TrainingEngine
from vlmtune.engine.prefetch import prefetch_images
from vlmtune.models.loading import load_processor
from vlmtune.models.vision import ImagePreprocessor
from vlmtune.render import datum_from_rendered

# Enough distinct images that the worker path (not the in-process shortcut) runs.
N_IMAGES = 80


def _images() -> list[bytes]:
    return [png_bytes(24 + 8 * (i % 7), 32 + 8 * (i % 5), seed=i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


def test_two_workers_give_the_in_process_tensors(processor) -> None:
    images = _images()
    reference = ImagePreprocessor(processor.image_processor, 1024, 16384)
    expected = [reference.preprocess([_decode(d)]) for d in images]

    ip = ImagePreprocessor(processor.image_processor, 1024, 16384)
    stats = prefetch_images(images + images[:5], ip, workers=2)  # duplicates count once
    assert stats.workers == 2 and stats.images == N_IMAGES and stats.decoded == N_IMAGES
    assert stats.failed == 0 and stats.evicted == 0
    decoded_before = ip.stats.decoded
    for data, (pv, grid) in zip(images, expected, strict=True):
        got_pv, got_grid = ip.preprocess_bytes(data)
        assert torch.equal(got_pv, pv) and torch.equal(got_grid, grid)
        assert not got_pv.is_shared()  # copied out of the workers' shared memory
    assert ip.stats.decoded == decoded_before  # all memory hits: the loop never decodes

    again = prefetch_images(images, ip, workers=2)
    assert again.already_cached == N_IMAGES and again.decoded == 0


def _decode(data: bytes):
    from vlmtune.models.vision import decode_image_bytes

    return decode_image_bytes(data)


def test_prefetch_fills_the_disk_cache_for_the_next_run(processor, tmp_path: Path) -> None:
    images = _images()
    first = ImagePreprocessor(processor.image_processor, cache_dir=tmp_path)
    assert prefetch_images(images, first, workers=2).decoded == N_IMAGES
    assert len(list(tmp_path.rglob("*.safetensors"))) == N_IMAGES

    second_run = ImagePreprocessor(processor.image_processor, cache_dir=tmp_path)
    stats = prefetch_images(images, second_run, workers=2)
    assert stats.disk_hits == N_IMAGES and stats.decoded == 0
    for data in images[:3]:
        assert torch.equal(second_run.preprocess_bytes(data)[0], first.preprocess_bytes(data)[0])


def test_workers_start_only_when_they_pay(processor, monkeypatch) -> None:
    from vlmtune.engine import prefetch

    cheap = prefetch_images(_images(), ImagePreprocessor(processor.image_processor))
    assert cheap.workers == 0 and cheap.decoded == N_IMAGES  # tiny PNGs: not worth it

    # As if the images were big and the machine idle (2 cores free):
    monkeypatch.setattr(prefetch, "PARALLEL_MIN_SECONDS", 0.0)
    monkeypatch.setattr(prefetch, "_auto_workers", lambda: 2)
    costly = prefetch_images(_images(), ImagePreprocessor(processor.image_processor))
    assert costly.workers == 2 and costly.decoded == N_IMAGES

    monkeypatch.setattr(prefetch, "_auto_workers", lambda: 0)  # busy machine
    busy = prefetch_images(_images(), ImagePreprocessor(processor.image_processor))
    assert busy.workers == 0 and busy.decoded == N_IMAGES


def test_failures_are_counted_not_raised(processor) -> None:
    ip = ImagePreprocessor(processor.image_processor)
    stats = prefetch_images([b"not an image", png_bytes(32, 32)], ip, workers=0)
    assert stats.failed == 1 and stats.decoded == 1 and "error" in stats.errors[0]
    assert "1 failed" in stats.summary()


def test_reports_what_did_not_fit_in_memory(processor) -> None:
    one = 16 * 1536 * 4  # a 64x64 input: 16 patches of 1536 floats
    ip = ImagePreprocessor(processor.image_processor, 4096, 4096, cache_bytes=3 * one)
    stats = prefetch_images([png_bytes(32, 32, seed=i) for i in range(10)], ip, workers=0)
    assert stats.decoded == 10 and stats.evicted == 7 and "did not fit" in stats.summary()


def test_engine_datums_after_prefetch_never_decode(tiny_dir) -> None:
    engine = TrainingEngine(EngineConfig(base_model=str(tiny_dir), min_pixels=4096))
    convs = [[user(image_part(32, 32, seed), "digit?"), assistant(str(seed))] for seed in range(20)]
    datums = [datum_from_rendered(engine.renderer.render(c), engine.image_token_id) for c in convs]
    stats = prefetch_images(datums, engine.image_preprocessor)  # small: in this process
    assert stats.decoded == 20 and stats.workers == 0
    decoded = engine.image_preprocessor.stats.decoded
    engine.forward(datums)
    assert engine.image_preprocessor.stats.decoded == decoded


# ---- activation checkpointing --------------------------------------------------------
def _mlp_calls(engine: TrainingEngine) -> dict[str, int]:
    """Calls of each decoder layer's / vision block's MLP (twice when recomputed)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextDecoderLayer,
        Qwen3VLVisionBlock,
    )

    calls = {"text": 0, "vision": 0}
    for module in engine.hf_model.modules():
        kind = (
            "text"
            if isinstance(module, Qwen3VLTextDecoderLayer)
            else "vision"
            if isinstance(module, Qwen3VLVisionBlock)
            else None
        )
        if kind is not None:
            # A *pre*-hook: checkpoint's recompute stops early, as soon as the last saved
            # tensor is rebuilt (inside the MLP), so a post-hook would not see it.
            module.mlp.register_forward_pre_hook(
                lambda *_, k=kind: calls.__setitem__(k, calls[k] + 1)
            )
    return calls


def test_checkpointing_covers_both_towers_and_changes_no_number(tiny_dir) -> None:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextDecoderLayer,
        Qwen3VLVisionBlock,
    )

    cfg = dict(
        base_model=str(tiny_dir), mode="full", freeze_vision_tower=False, freeze_projector=False
    )
    plain = TrainingEngine(EngineConfig(**cfg))
    ckpt = TrainingEngine(EngineConfig(**cfg, gradient_checkpointing=True))
    layers = [
        m
        for m in ckpt.hf_model.modules()
        if isinstance(m, (Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock))
    ]
    assert {type(m) for m in layers} == {Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock}
    assert all(m.gradient_checkpointing for m in layers)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.hf_model.modules())

    convs = [
        [user(image_part(64, 32, 1), "What digit is this?"), assistant("3")],
        [user(image_part(32, 32, 2), "and this?"), assistant("seven")],
    ]
    datums = [datum_from_rendered(plain.renderer.render(c), plain.image_token_id) for c in convs]
    results = []
    for engine in (plain, ckpt):
        calls = _mlp_calls(engine)
        out = engine.forward_backward(datums)
        grads = {
            n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None
        }
        results.append((out.metrics["loss:sum"], grads, dict(calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    n_text = sum(isinstance(m, Qwen3VLTextDecoderLayer) for m in layers)
    n_vision = sum(isinstance(m, Qwen3VLVisionBlock) for m in layers)
    # Two micro-batches (one per datum); checkpointed layers run again in backward.
    assert calls_a == {"text": 2 * n_text, "vision": 2 * n_vision}
    assert calls_b == {"text": 4 * n_text, "vision": 4 * n_vision}
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(".visual." in n for n in grads_a)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-6, rtol=1e-5, msg=name)
