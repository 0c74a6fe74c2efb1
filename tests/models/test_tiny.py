from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.models import tiny as tiny_mod
from vlmtune.models.constants import QWEN3_VL_ADDED_TOKENS
from vlmtune.models.registry import TINY_SPEC
from vlmtune.models.tiny_tokenizer import build_tiny_tokenizer

REFERENCE = Path("/work/shared/reference/qwen3-vl-instruct")
REFERENCE_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
ASSET = Path(tiny_mod.__file__).parent / "assets" / "chat_template.jinja"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_template_is_the_reference() -> None:
    assert _sha(ASSET) == REFERENCE_TEMPLATE_SHA256
    if (REFERENCE / "chat_template.jinja").exists():
        assert _sha(ASSET) == _sha(REFERENCE / "chat_template.jinja")


def test_model_dir_template_is_the_reference(tiny_dir: Path) -> None:
    assert _sha(tiny_dir / "chat_template.jinja") == REFERENCE_TEMPLATE_SHA256


def test_tokenizer_ids_match_qwen3_vl(tiny_processor) -> None:
    tok = tiny_processor.tokenizer
    for content, token_id, special in QWEN3_VL_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(content) == token_id
        assert tok.added_tokens_decoder[token_id].special is special
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    if (REFERENCE / "special_tokens.json").exists():
        ref = json.loads((REFERENCE / "special_tokens.json").read_text())
        for group in ("special_tokens", "other_added_tokens"):
            for content, token_id in ref[group].items():
                assert tok.convert_tokens_to_ids(content) == token_id


def test_tokenizer_digits_and_words(tiny_processor) -> None:
    tok = tiny_processor.tokenizer
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("2024", add_special_tokens=False)["input_ids"]) == 4  # digits split
    ids = tok("<|im_start|>user\nWhat digit is this?<|im_end|>", add_special_tokens=False)[
        "input_ids"
    ]
    assert ids[0] == 151644 and ids[-1] == 151645
    assert len(ids) <= 9  # common words are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat digit is this?"
    # Unseen text and non-ASCII still round-trip (byte-level).
    text = "Zebra crossings: ü, 日本, 😀"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_build_is_deterministic() -> None:
    assert build_tiny_tokenizer().to_str() == build_tiny_tokenizer().to_str()


def test_model_dir_contents(tiny_dir: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
    ):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["text_config"]["vocab_size"] == 151936
    assert config["image_token_id"] == 151655 and config["video_token_id"] == 151656
    assert config["vision_start_token_id"] == 151652 and config["vision_end_token_id"] == 151653
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


def test_loads_with_auto_classes_and_trains(tiny_dir: Path) -> None:
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Qwen3VLForConditionalGeneration,
    )

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == TINY_SPEC.params
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4 image tokens
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0

    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    batch = processor(
        text=[prompt], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt"
    )
    gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 3


def test_build_is_deterministic_and_atomic(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    built = tiny_mod.tiny_model_dir(tmp_path)
    assert built == tmp_path / f"tiny-qwen3-vl-{tiny_mod.TINY_MODEL_VERSION}"
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temp dir left behind
    a, b = load_file(built / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (built / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    assert tiny_mod.tiny_model_dir(tmp_path) == built  # second call: cached


def test_losing_the_build_race_uses_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / f"tiny-qwen3-vl-{tiny_mod.TINY_MODEL_VERSION}"

    def fake_build(out_dir: Path, *, moe: bool = False) -> None:
        (out_dir / "config.json").write_text("{}")
        (out_dir / "loser").write_text("")
        # Another process finishes first while we are still building.
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "winner").write_text("")

    monkeypatch.setattr(tiny_mod, "build_tiny_model", fake_build)
    assert tiny_mod.tiny_model_dir(tmp_path) == target
    assert (target / "winner").exists() and not (target / "loser").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_cache_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path))
    assert tiny_mod.default_cache_root() == tmp_path
    monkeypatch.delenv("VLMTUNE_CACHE")
    assert tiny_mod.default_cache_root() == Path(os.path.expanduser("~")) / ".cache" / "vlmtune"
