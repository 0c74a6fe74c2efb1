"""Loading Qwen3-VL checkpoints for training: full, LoRA or QLoRA, with freezing.

Never touches the network: hub ids are resolved from the local Hugging Face cache only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlmtune.models.registry import ModelSpec, UnknownModelError, get_model_spec, spec_from_dir
from vlmtune.models.tiny import TINY_MODEL_NAME, TINY_MOE_MODEL_NAME, tiny_model_dir

Mode = Literal["full", "lora", "qlora"]

# Module-name prefixes inside Qwen3VLForConditionalGeneration (transformers 5).
LANGUAGE_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
# The projector: the final patch merger and the deepstack mergers that feed the LLM.
PROJECTOR_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")


class ModelNotFoundError(FileNotFoundError):
    """A model id that is neither a directory nor in the local Hugging Face cache."""


@dataclass
class LoadedModel:
    model: nn.Module  # the HF model, or a peft PeftModel wrapping it
    processor: Any
    spec: ModelSpec
    path: Path  # the resolved checkpoint directory
    mode: Mode
    base_name: str  # what to record as the adapter's base model (portable name if any)


def resolve_model_path(name_or_path: str) -> Path:
    """A local directory for a model name, directory, or hub id; never downloads."""
    if name_or_path.strip().lower() in (TINY_MODEL_NAME, "tiny"):
        return tiny_model_dir()
    if name_or_path.strip().lower() in (TINY_MOE_MODEL_NAME, "tiny-moe"):
        return tiny_model_dir(moe=True)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    repo_id = name_or_path
    with suppress(KeyError):
        repo_id = get_model_spec(name_or_path).name  # aliases such as "qwen3-vl-8b"
    if repo_id.count("/") == 1:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            pass
    raise ModelNotFoundError(
        f"model {name_or_path!r} is not a local directory and {repo_id!r} is not in the local "
        f"Hugging Face cache (vlmtune never downloads). Fetch it first with "
        f"`huggingface-cli download {repo_id}` (or `hf download {repo_id}`), "
        "or pass the path of a checkpoint directory."
    )


def load_processor(
    path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    """AutoProcessor for a checkpoint, with the image processor's pixel limits overridden."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    if min_pixels is not None or max_pixels is not None:
        ip = processor.image_processor
        size = {"shortest_edge": ip.size["shortest_edge"], "longest_edge": ip.size["longest_edge"]}
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        ip.size = _size_dict(size)
    return processor


def _size_dict(size: dict[str, int]) -> Any:
    try:  # transformers 5 keeps sizes as SizeDict; a plain dict works too
        from transformers.image_utils import SizeDict

        return SizeDict(**size)
    except (ImportError, TypeError):
        return size


def _check_qlora_possible() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "qlora needs a CUDA GPU (bitsandbytes 4-bit); use mode='lora' on the CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "qlora needs the bitsandbytes package: pip install bitsandbytes (or use mode='lora')"
        ) from e


def load_model(
    name_or_path: str,
    *,
    mode: Mode = "full",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: list[str] | Literal["all-linear"] = "all-linear",
    freeze_vision_tower: bool = True,
    freeze_projector: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    structure_only: bool = False,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load model + processor, set what trains, and wrap in LoRA for lora/qlora.

    ``min_pixels``/``max_pixels`` default to the model spec's training limits.

    ``structure_only`` reads no weights: the same modules (LoRA adapters included) are
    built on the meta device, for FSDP ranks that receive rank 0's weights after
    sharding, so that only one process per job holds the whole model in host memory.
    """
    from transformers import AutoModelForImageTextToText

    if mode not in ("full", "lora", "qlora"):
        raise ValueError(f"mode must be 'full', 'lora' or 'qlora', got {mode!r}")
    if mode == "qlora":
        _check_qlora_possible()  # before reading gigabytes of weights
    path = resolve_model_path(name_or_path)
    adapter_dir: Path | None = None
    if (path / "adapter_config.json").is_file():  # a LoRA run's final/ or a sampler snapshot
        adapter_dir, path = path, resolve_model_path(adapter_base_name(path))
    try:
        spec = get_model_spec(str(path) if adapter_dir else name_or_path)
    except UnknownModelError:  # e.g. a cached hub id outside the registry
        spec = spec_from_dir(path)
    # A directory vlmtune (or the user) saved carries the pixel limits it was trained
    # with; the family defaults apply only to registry names and hub ids.
    own_limits = adapter_dir is not None or Path(name_or_path).expanduser().is_dir()
    processor = load_processor(
        adapter_dir or path,
        min_pixels if min_pixels is not None else (None if own_limits else spec.min_pixels),
        max_pixels if max_pixels is not None else (None if own_limits else spec.max_pixels),
    )
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
            # The vision tower and projector stay in full precision.
            llm_int8_skip_modules=["visual", "lm_head"],
        )
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    if structure_only:
        if mode == "qlora":
            raise ValueError("qlora models cannot be built without their weights")
        model = _build_on_meta(path, dtype, attn_implementation)
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
        if mode != "qlora":
            model.to(device)
    base_name = spec.name if not Path(spec.name).is_dir() else str(path)
    if adapter_dir is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if mode == "full":  # inference or full fine-tuning from a LoRA checkpoint: fold it in
            if not structure_only:  # merged, the structure is the base model's
                model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        else:  # keep training the same adapter (its rank and targets win over the arguments)
            for p in model.parameters():
                p.requires_grad_(False)
            if structure_only:
                adapter_config = LoraConfig.from_pretrained(str(adapter_dir))
                adapter_config.inference_mode = False
                model = get_peft_model(model, adapter_config)
            else:
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
            if gradient_checkpointing and mode != "qlora":
                _enable_checkpointing(model)
            return LoadedModel(model, processor, spec, path, mode, base_name)

    if gradient_checkpointing and mode != "qlora":  # qlora: prepare_model_for_kbit_training
        _enable_checkpointing(model)
    if mode == "full":
        set_trainable(model, freeze_vision_tower, freeze_projector)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_regex(
                model, target_modules, freeze_vision_tower, freeze_projector
            ),
            bias="none",
        )
        model = get_peft_model(model, config)
        model.peft_config["default"].base_model_name_or_path = base_name
    return LoadedModel(model, processor, spec, path, mode, base_name)


def _build_on_meta(path: Path, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The checkpoint's model with every parameter and buffer on the meta device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )


def _enable_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing needs no input-grad hook when the embeddings are frozen.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False


def set_trainable(model: nn.Module, freeze_vision_tower: bool, freeze_projector: bool) -> None:
    """Full fine-tuning: everything trains except the frozen vision tower / projector."""
    for name, p in model.named_parameters():
        if name.startswith(PROJECTOR_PREFIXES):
            p.requires_grad_(not freeze_projector)
        elif name.startswith(VISION_PREFIX):
            p.requires_grad_(not freeze_vision_tower)
        else:
            p.requires_grad_(True)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear4bit subclasses nn.Linear, but check by name to not import it.
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def lora_target_regex(
    model: nn.Module,
    target_modules: list[str] | Literal["all-linear"],
    freeze_vision_tower: bool,
    freeze_projector: bool,
) -> str:
    """A peft ``target_modules`` regex naming exactly the linears that get adapters.

    peft's own "all-linear" would also adapt the vision tower; listing modules by name
    keeps a frozen tower adapter-free. Layer indices are folded into ``\\d+`` so the
    pattern stays short for 94-layer models. ``lm_head`` never gets an adapter.
    """
    patterns: set[str] = set()
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        if name.startswith(PROJECTOR_PREFIXES):
            if freeze_projector:
                continue
        elif name.startswith(VISION_PREFIX):
            if freeze_vision_tower:
                continue
        elif not name.startswith(LANGUAGE_PREFIX):
            continue  # lm_head and anything outside the three parts
        leaf = name.rsplit(".", 1)[-1]
        if target_modules != "all-linear" and leaf not in target_modules:
            continue
        patterns.add(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)))
    if not patterns:
        raise ValueError(f"no linear layer matches target_modules={target_modules!r}")
    return "^(" + "|".join(sorted(patterns)) + ")$"


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to ``out_dir``; on success it replaces ``out_dir`` by rename."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint dir should not be
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _unwrap(loaded_or_model: LoadedModel | nn.Module) -> nn.Module:
    return loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model_dir(
    loaded_or_model: LoadedModel | nn.Module,
    processor: Any,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a servable directory atomically: full weights or LoRA adapter, plus processor.

    Full: loads with ``AutoModelForImageTextToText.from_pretrained(out_dir)``.
    Adapter: ``PeftModel.from_pretrained(base, out_dir)`` where ``base`` is the model
    named by ``adapter_config.json``'s ``base_model_name_or_path`` (a registry name such
    as ``tiny-qwen3-vl`` resolves with ``resolve_model_path``); ``merge_adapter_to_dir``
    folds it into a full directory. Both carry the processor files.

    ``state_dict`` replaces the model's own tensors (a sharded model's weights,
    gathered on one rank); an adapter's may hold just the trainable weights.
    ``dtype`` is what the config records when ``state_dict`` holds a different dtype
    from the model's (transformers writes the model's).
    """
    model = _unwrap(loaded_or_model)
    with atomic_dir(out_dir) as tmp:
        if is_peft_model(model):
            if isinstance(loaded_or_model, LoadedModel):
                for cfg in model.peft_config.values():
                    cfg.base_model_name_or_path = loaded_or_model.base_name
            # save_embedding_layers="auto" would look the base model up on the Hub (a
            # network call); adapters never target the embeddings, so there is nothing to check.
            model.save_pretrained(
                str(tmp),
                safe_serialization=True,
                save_embedding_layers=False,
                **({"state_dict": state_dict} if state_dict is not None else {}),
            )
        else:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            if dtype is not None:
                _set_config_dtype(tmp / "config.json", dtype)
        processor.save_pretrained(str(tmp))
    return Path(out_dir)


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Set ``dtype`` in a saved config.json and in each sub-config that records one."""
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    for sub in config.values():
        if isinstance(sub, dict) and "dtype" in sub:
            sub["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_base_name(adapter_dir: Path) -> str:
    """The base model an adapter directory names (``base_model_name_or_path``)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model")
    return str(base)


def merge_adapter_to_dir(
    adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None
) -> Path:
    """Fold a LoRA adapter into its base model and write a full model directory."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter_dir = Path(adapter_dir)
    base_path = resolve_model_path(base or adapter_base_name(adapter_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(base_path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # The adapter dir's processor carries the run's pixel limits; fall back to the base's.
    processor_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    processor = load_processor(processor_src)
    return save_model_dir(merged, processor, out_dir)
