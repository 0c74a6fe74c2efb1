from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.models.adapters import LoraSettings
from vlmtune.models.loading import (
    BuildOptions,
    LoadedModel,
    ModelNotFoundError,
    ModelRequest,
    load_model,
    load_processor,
    resolve_model_path,
    trainable_parameter_count,
)
from vlmtune.models.registry import TINY_SPEC
from vlmtune.models.saving import merge_adapter_to_dir, save_model_dir

LORA = ModelRequest("tiny-qwen3-vl", mode="lora")
LORA_4 = ModelRequest("tiny-qwen3-vl", mode="lora", lora=LoraSettings(r=4))


@pytest.fixture(scope="module")
def batch(tiny_dir: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Digit?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (64, 96), "red")], return_tensors="pt")


def _hf_cache(root: Path, repo_id: str) -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snap / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    return snap


def _use_hf_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    import huggingface_hub.constants

    # The constant is read from the environment at import time, maybe before this test.
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))


def test_resolve_paths(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_path("tiny-qwen3-vl") == tiny_dir
    assert resolve_model_path(str(tiny_dir)) == tiny_dir
    _use_hf_cache(monkeypatch, tmp_path)
    snap = _hf_cache(tmp_path, "Qwen/Qwen3-VL-2B-Instruct")
    assert resolve_model_path("Qwen/Qwen3-VL-2B-Instruct").resolve() == snap.resolve()
    assert resolve_model_path("qwen3-vl-2b").resolve() == snap.resolve()  # alias -> hub id


def test_missing_hub_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_hf_cache(monkeypatch, tmp_path)
    with pytest.raises(
        ModelNotFoundError, match="huggingface-cli download Qwen/Qwen3-VL-8B-Instruct"
    ):
        resolve_model_path("qwen3-vl-8b")
    with pytest.raises(ModelNotFoundError, match="checkpoint directory"):
        resolve_model_path("no/such-model")


def test_load_processor_pixel_limits(tiny_dir: Path) -> None:
    p = load_processor(tiny_dir, min_pixels=32 * 32, max_pixels=32 * 32 * 8)
    assert p.image_processor.size["shortest_edge"] == 32 * 32
    assert p.image_processor.size["longest_edge"] == 32 * 32 * 8
    out = p(text=["<|image_pad|>"], images=[Image.new("RGB", (1000, 1000))])
    assert len(out["input_ids"][0]) == 4  # 64x64 after the cap: at most 8 tokens


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_mode_freezing() -> None:
    lm = load_model("tiny-qwen3-vl")
    assert isinstance(lm, LoadedModel) and lm.mode == "full" and lm.spec == TINY_SPEC
    names = _trainable_names(lm.model)
    assert any(n.startswith("model.language_model.") for n in names)
    assert not any(n.startswith("model.visual.") for n in names)
    # Defaults: the training pixel limits of the spec.
    assert lm.processor.image_processor.size["shortest_edge"] == TINY_SPEC.min_pixels

    lm = load_model(ModelRequest("tiny-qwen3-vl", freeze_vision_tower=False, freeze_projector=True))
    names = _trainable_names(lm.model)
    assert any(n.startswith("model.visual.blocks.") for n in names)
    assert not any(n.startswith("model.visual.merger.") for n in names)
    assert not any(n.startswith("model.visual.deepstack_merger_list.") for n in names)

    lm = load_model(ModelRequest("tiny-qwen3-vl", freeze_vision_tower=True, freeze_projector=False))
    names = _trainable_names(lm.model)
    assert any(n.startswith("model.visual.merger.") for n in names)
    assert any(n.startswith("model.visual.deepstack_merger_list.") for n in names)
    assert not any(n.startswith("model.visual.blocks.") for n in names)
    trainable, total = trainable_parameter_count(lm.model)
    assert 0 < trainable < total == TINY_SPEC.params


def test_lora_targets_language_linears_only(batch) -> None:
    lm = load_model(LORA_4)
    names = _trainable_names(lm.model)
    assert names and all("lora_" in n for n in names)
    assert all(".language_model." in n for n in names)
    assert not any("lm_head" in n for n in names)
    targets = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in names}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    out = lm.model(**batch)  # the peft wrapper passes pixel_values / image_grid_thw through
    out.logits[0, -1].logsumexp(-1).backward()
    assert all(p.grad is not None for n, p in lm.model.named_parameters() if p.requires_grad)


def test_lora_options() -> None:
    lm = load_model(
        ModelRequest(
            "tiny-qwen3-vl",
            mode="lora",
            lora=LoraSettings(target_modules=["q_proj", "v_proj", "qkv"]),
            freeze_vision_tower=False,
        )
    )
    names = _trainable_names(lm.model)
    assert any(".visual.blocks." in n for n in names)  # unfrozen tower gets adapters...
    assert not any(".merger." in n for n in names)  # ...the frozen projector does not
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} <= {"q_proj", "v_proj", "qkv"}
    with pytest.raises(ValueError, match="no linear layer"):
        load_model(
            ModelRequest("tiny-qwen3-vl", mode="lora", lora=LoraSettings(target_modules=["nope"]))
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="qlora needs a CUDA GPU"):
        load_model(ModelRequest("tiny-qwen3-vl", mode="qlora"))


def test_gradient_checkpointing(batch) -> None:
    lm = load_model(LORA, BuildOptions(gradient_checkpointing=True))
    lm.model.train()
    lm.model(**batch).logits.sum().backward()
    assert any(p.grad is not None for p in lm.model.parameters() if p.requires_grad)


def test_save_full_model_dir(tmp_path: Path, batch) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    lm = load_model("tiny-qwen3-vl")
    with torch.no_grad():
        lm.model.model.language_model.norm.weight.add_(0.5)
    out = save_model_dir(lm, lm.processor, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.size["longest_edge"] == TINY_SPEC.max_pixels
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, lm.model(**batch).logits, atol=1e-5)
    # Overwriting an existing directory is atomic too.
    save_model_dir(lm.model, lm.processor, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_adapter_save_load_and_merge(tmp_path: Path, batch, tiny_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    lm = load_model(LORA_4)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter do something
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        expected = lm.model(**batch).logits
    adapter = save_model_dir(lm, lm.processor, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    # Not the alias "tiny-qwen3-vl", which only vlmtune resolves: the directory itself.
    assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()

    base = AutoModelForImageTextToText.from_pretrained(cfg["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, adapter)
    # transformers' peft integration loads base + adapter from the directory alone.
    integrated = AutoModelForImageTextToText.from_pretrained(adapter, local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, expected, atol=1e-4)
        assert torch.allclose(integrated(**batch).logits, expected, atol=1e-4)

    # An adapter saved before the base was recorded as a directory still merges.
    old_cfg = {**cfg, "base_model_name_or_path": "tiny-qwen3-vl"}
    (adapter / "adapter_config.json").write_text(json.dumps(old_cfg))

    merged_dir = merge_adapter_to_dir(adapter, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
    assert load_model(str(merged_dir)).spec.params == TINY_SPEC.params

    # Loading the adapter dir for full training merges it the same way, weight for weight.
    folded = load_model(str(adapter)).model
    assert folded.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(t, merged.state_dict()[k]) for k, t in folded.state_dict().items())
    # LoRA mode keeps training the saved adapter: its rank wins over the request's.
    resumed = load_model(ModelRequest(str(adapter), mode="lora", lora=LoraSettings(r=16))).model
    assert resumed.peft_config["default"].r == 4
    assert _trainable_names(resumed) == _trainable_names(lm.model)
    with torch.no_grad():
        assert torch.allclose(resumed(**batch).logits, expected, atol=1e-4)
    # Without weights (an FSDP rank > 0): the same modules, adapter included, on meta.
    shell = load_model(
        ModelRequest(str(adapter), mode="lora"), BuildOptions(structure_only=True)
    ).model
    assert {n for n, _ in shell.named_parameters()} == {n for n, _ in resumed.named_parameters()}
    assert all(p.is_meta for p in shell.parameters())
    assert _trainable_names(shell) == _trainable_names(resumed)


def test_model_request_names_a_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode must be 'full', 'lora' or 'qlora', got 'fft'"):
        ModelRequest("tiny-qwen3-vl", mode="fft")  # type: ignore[arg-type]


def test_adapter_base_is_a_hub_id_or_an_absolute_directory(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmtune.models.loading import portable_base_name
    from vlmtune.models.registry import get_model_spec

    assert portable_base_name(TINY_SPEC, tiny_dir, "tiny-qwen3-vl") == str(tiny_dir.resolve())
    spec_8b = get_model_spec("qwen3-vl-8b")
    assert portable_base_name(spec_8b, tmp_path, "qwen3-vl-8b") == "Qwen/Qwen3-VL-8B-Instruct"
    # A cached hub id outside the registry: its spec is named after the snapshot dir.
    snap = _hf_cache(tmp_path / "hub", "someorg/Custom-VL")
    custom = replace(TINY_SPEC, name=str(snap))
    assert portable_base_name(custom, snap, "someorg/Custom-VL") == "someorg/Custom-VL"
    # A relative directory that looks like owner/name is a directory, recorded absolute.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    local = replace(TINY_SPEC, name="runs/base")
    assert portable_base_name(local, Path("runs/base"), "runs/base") == str(
        (tmp_path / "runs" / "base").resolve()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_bf16_on_cuda(batch) -> None:
    lm = load_model(LORA, BuildOptions(dtype=torch.bfloat16, device="cuda"))
    cuda_batch = {k: v.to("cuda") for k, v in batch.items()}
    lm.model(**cuda_batch).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in lm.model.parameters() if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda(batch) -> None:
    pytest.importorskip("bitsandbytes")
    lm = load_model(
        ModelRequest("tiny-qwen3-vl", mode="qlora"),
        BuildOptions(dtype=torch.bfloat16, device="cuda"),
    )
    assert any(type(m).__name__ == "Linear4bit" for m in lm.model.modules())
    cuda_batch = {k: v.to("cuda") for k, v in batch.items()}
    lm.model(**cuda_batch).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in lm.model.parameters() if p.requires_grad)


def test_models_loaded_from_several_threads_at_once_are_whole() -> None:
    """A server rebuilds several runs' engines at once after a restart. transformers
    builds under a process-wide meta-device patch, so unserialised loads left meta
    tensors in each other's models ("Cannot copy out of meta tensor")."""
    import threading

    from vlmtune.models.loading import ModelRequest, load_model

    problems: list[str] = []

    def load() -> None:
        try:
            model = load_model(ModelRequest("tiny-qwen3-vl")).model
            meta = [name for name, p in model.named_parameters() if p.is_meta]
            if meta:
                problems.append(f"{len(meta)} parameters left on the meta device")
        except Exception as e:  # the failure this guards against
            problems.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
