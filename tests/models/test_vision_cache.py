"""The preprocessed-pixel caches (memory and disk) and the one set of pixel limits."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.models import vision
from vlmtune.models.vision import ImagePreprocessor


def _png(size: tuple[int, int], color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = vision.decode_image_bytes
    monkeypatch.setattr(vision, "decode_image_bytes", lambda d: calls.append(1) or real(d))
    return calls


def test_second_call_is_a_memory_hit(tiny_processor, count_decodes) -> None:
    ip = ImagePreprocessor.from_processor(tiny_processor)
    a = _png((64, 48))
    first = ip.preprocess_bytes(a)
    second = ip.preprocess_bytes(bytes(a))
    assert len(count_decodes) == 1 and ip.stats.decoded == 1 and ip.stats.memory_hits == 1
    assert first[0] is second[0]


def test_key_changes_with_every_pixel_setting(tiny_processor) -> None:
    data = _png((64, 64))
    base = ImagePreprocessor(tiny_processor.image_processor, 4096, 8192)
    same = ImagePreprocessor(copy.deepcopy(tiny_processor.image_processor), 4096, 8192)
    assert base.cache_key(data) == same.cache_key(data)  # stable across instances
    assert base.cache_key(data) != base.cache_key(_png((64, 64), "blue"))

    variants = [
        ImagePreprocessor(tiny_processor.image_processor, 1024, 8192),  # min_pixels
        ImagePreprocessor(tiny_processor.image_processor, 4096, 16384),  # max_pixels
    ]
    for attr, value in [
        ("image_mean", [0.1, 0.2, 0.3]),
        ("image_std", [0.3, 0.2, 0.1]),
        ("resample", 2),
        ("temporal_patch_size", 1),
        ("rescale_factor", 1 / 127),
        ("do_normalize", False),
    ]:
        ipc = copy.deepcopy(tiny_processor.image_processor)
        setattr(ipc, attr, value)
        variants.append(ImagePreprocessor(ipc, 4096, 8192))
    subclass = type("OtherProcessor", (type(tiny_processor.image_processor),), {})
    other = copy.deepcopy(tiny_processor.image_processor)
    other.__class__ = subclass
    variants.append(ImagePreprocessor(other, 4096, 8192))
    keys = {v.cache_key(data) for v in variants}
    assert base.cache_key(data) not in keys and len(keys) == len(variants)


def test_disk_cache_survives_a_new_instance(tiny_processor, tmp_path: Path, count_decodes):
    images = [_png((64, 64), c) for c in ("red", "green")] + [_png((100, 37), "blue")]
    first = ImagePreprocessor(tiny_processor.image_processor, 4096, 8192, cache_dir=tmp_path)
    expected = [first.preprocess_bytes(d) for d in images]
    assert len(count_decodes) == 3 and first.stats.disk_writes == 3
    files = sorted(tmp_path.rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3
    assert not [f for f in files if f.name.endswith(".tmp")]  # atomic: no leftovers

    again = ImagePreprocessor(tiny_processor.image_processor, 4096, 8192, cache_dir=tmp_path)
    for data, (pv, grid) in zip(images, expected, strict=True):
        got_pv, got_grid = again.preprocess_bytes(data)
        assert torch.equal(got_pv, pv) and torch.equal(got_grid, grid)
    assert len(count_decodes) == 3 and again.stats.disk_hits == 3

    # Other limits: other files, decoded afresh; the first run's files stay valid.
    bigger = ImagePreprocessor(tiny_processor.image_processor, 4096, 16384, cache_dir=tmp_path)
    bigger.preprocess_bytes(images[2])
    assert len(count_decodes) == 4 and bigger.stats.decoded == 1


def test_corrupt_cache_file_is_recomputed(tiny_processor, tmp_path: Path) -> None:
    data = _png((64, 64))
    ip = ImagePreprocessor(tiny_processor.image_processor, cache_dir=tmp_path)
    pv, _ = ip.preprocess_bytes(data)
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    fresh = ImagePreprocessor(tiny_processor.image_processor, cache_dir=tmp_path)
    assert torch.equal(fresh.preprocess_bytes(data)[0], pv)
    assert (
        fresh.stats.disk_errors == 1 and fresh.stats.decoded == 1 and fresh.stats.disk_writes == 1
    )


def test_preprocessor_survives_pickling(tiny_processor, tmp_path: Path) -> None:
    import pickle

    ip = ImagePreprocessor(tiny_processor.image_processor, 4096, 8192, cache_dir=tmp_path)
    ip.preprocess_bytes(_png((64, 64)))
    clone = pickle.loads(pickle.dumps(ip))
    assert clone.fingerprint() == ip.fingerprint() and clone.cache_info()["entries"] == 0
    assert clone.preprocess_bytes(_png((64, 64)))[1].tolist() == [[1, 4, 4]]


# ---- one set of pixel limits: token counts, pixels, engine, sampling, server -----------
SIZES = [(8, 8), (32, 32), (64, 64), (100, 37), (333, 517), (1200, 90), (640, 480)]


@pytest.mark.parametrize("limits", [(32 * 32, 32 * 32 * 4), (64 * 64, 64 * 64), (2048, 40_000)])
def test_num_tokens_and_preprocess_use_the_same_limits(tiny_processor, limits) -> None:
    # The HF processor's own `size` differs from these limits on purpose: the
    # preprocessor's limits, not the processor's, must decide both numbers.
    assert tiny_processor.image_processor.size["longest_edge"] != limits[1]
    ip = ImagePreprocessor(tiny_processor.image_processor, *limits)
    own = ImagePreprocessor(tiny_processor.image_processor)  # the processor's own size
    differs = 0
    for w, h in SIZES:
        _, grid = ip.preprocess_bytes(_png((w, h)))
        rw, rh = ip.resized_size(w, h)
        assert grid.tolist() == [[1, rh // 16, rw // 16]], (w, h)
        assert int(grid.prod()) // 4 == ip.num_tokens(w, h), (w, h)
        differs += own.num_tokens(w, h) != ip.num_tokens(w, h)
    assert differs  # so the limits really were the preprocessor's


def test_engine_renderer_sampler_and_server_share_the_limits(tiny_dir) -> None:
    from tests.conftest import assistant, image_part, user
    from vlmtune.engine.engine import EngineConfig, TrainingEngine
    from vlmtune.render import datum_from_rendered

    lo, hi = 32 * 32, 32 * 32 * 9
    engine = TrainingEngine(EngineConfig(base_model=str(tiny_dir), min_pixels=lo, max_pixels=hi))
    ip = engine.image_preprocessor
    assert (ip.min_pixels, ip.max_pixels) == (lo, hi)
    size = engine.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (lo, hi)  # saved with checkpoints
    assert engine.renderer.image_preprocessor is ip  # token counts at render time

    # Training and sampling collate through the same preprocessor: the rendered count
    # (num_tokens) must equal the count from the pixels (collate raises otherwise).
    conv = [user(image_part(200, 120, 1), "what?"), assistant("x")]
    datum = datum_from_rendered(engine.renderer.render(conv), engine.image_token_id)
    before = ip.stats.decoded + ip.stats.memory_hits
    batch = engine.collate([datum])
    assert ip.stats.decoded + ip.stats.memory_hits == before + 1
    n_image = int((batch.input_ids_B_T == engine.image_token_id).sum())
    assert n_image == ip.num_tokens(200, 120) == int(batch.image_grid_thw.prod()) // 4

    # The server validates image chunks with the limits the engine will use.
    from vlmtune.server.run_config import model_pixels

    _, server_lo, server_hi = model_pixels(engine.config)
    assert (server_lo, server_hi) == (lo, hi)

    # Defaults (no limits given): the model spec's, everywhere.
    default = TrainingEngine(EngineConfig(base_model=str(tiny_dir)), loaded=None)
    _, d_lo, d_hi = model_pixels(default.config)
    dip = default.image_preprocessor
    assert (dip.min_pixels, dip.max_pixels) == (d_lo, d_hi)
