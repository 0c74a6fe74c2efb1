"""Resumable training state: trainable weights, optimizer, RNG, step; written atomically.

Weights and optimizer state are a ``torch.distributed.checkpoint`` (DCP) directory:
under torchrun each rank writes its own shard, and DCP reshards on load, so a run
saved on N processes resumes on M (one plain process included). Only what trains
is saved, a tied weight once: frozen base weights (a LoRA run's whole base, a frozen
vision tower) come back from the base model.

    step-N/dcp/            DCP shards + .metadata
    step-N/rng-<rank>.pt   each rank's RNG state
    step-N/state.json      step, engine config, the recipe's extra dict
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmtune.atomic import atomic_dir
from vlmtune.engine import distributed as dist_utils
from vlmtune.engine import placement

DCP_DIR = "dcp"


def save_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: dist_utils.DistInfo,
    meta: dict[str, Any],
) -> Path:
    """Write the state into ``path`` (collective under torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    with atomic_dir(path, _TorchRanks(info)) as tmp:
        state: dict[str, Any] = {"model": trainable_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        torch.save(_rng_state(), tmp / f"rng-{info.rank}.pt")
        if info.is_main:
            meta = {**meta, "world_size": info.world_size}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    return path


def load_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, info: dist_utils.DistInfo
) -> dict[str, Any]:
    """Load what ``save_training_state`` wrote, at this run's world size; returns the meta."""
    meta = read_meta(path)
    if not (path / DCP_DIR).is_dir():
        if info.enabled:
            raise ValueError(
                f"{path}: a checkpoint from an older single-process vlmtune; resume it in one process"
            )
        _load_legacy(path, model, optimizer)
        return meta
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    # The same keys as saved: checkpoints from before the tied-name filter hold more,
    # which DCP leaves unread.
    state: dict[str, Any] = {"model": trainable_state_dict(model)}
    if optimizer is not None and _has_optimizer_state(path / DCP_DIR):
        # A template holding this run's shards; DCP fills it in place.
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    # DCP raises on any template key missing from the checkpoint; strict=False below
    # only lets the frozen weights (not in the checkpoint) keep their base values.
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_model_state_dict(
        model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False)
    )
    if optimizer is not None and "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    # On more ranks than were saved, the new ones take rank 0's RNG state.
    rng = path / f"rng-{info.rank}.pt"
    _set_rng_state(torch.load(rng if rng.exists() else path / "rng-0.pt", weights_only=False))
    return meta


# EngineConfig fields that decide what a checkpoint holds and what its tensors mean:
# which weights train (mode, targets, freezing), their shapes (rank) and the base they
# add to. Resuming under other values fails inside DCP or, worse, loads silently into a
# different model. lora_alpha changes no shape, but the scale the LoRA weights were
# trained under: the same weights would describe another model.
STATE_FIELDS = (
    "base_model", "mode", "lora_rank", "lora_alpha", "target_modules",
    "freeze_vision_tower", "freeze_projector", "freeze_embeddings",
)  # fmt: skip
_LORA_FIELDS = frozenset({"lora_rank", "lora_alpha", "target_modules"})


def state_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, value now)`` for each ``STATE_FIELDS`` entry that differs
    between two engine configs (``asdict(EngineConfig)``, as ``state.json`` keeps it).
    LoRA settings are not compared between two full fine-tunes, which ignore them."""
    both_full = saved.get("mode") == now.get("mode") == "full"
    return [
        (key, saved.get(key), now.get(key))
        for key in STATE_FIELDS
        if key in saved
        and saved.get(key) != now.get(key)
        and not (both_full and key in _LORA_FIELDS)
    ]


def read_meta(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint ``path``: step, engine config, extra, world size."""
    meta = json.loads((path / "state.json").read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError("state.json has no integer step")
    return meta


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a missing, truncated or unreadable part),
    or None. Cheap: it reads the small files and compares each shard's size with the
    byte ranges DCP's own ``.metadata`` records for it, without reading the tensors (a
    large run's checkpoint is many GB). A checkpoint is published only once whole
    (``atomic_dir``), so this catches what happens to it afterwards: a copy cut short,
    a file deleted, a disk that lost the tail of a file. Bytes changed in place keep
    their sizes and are found only by loading."""
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return "state.json: missing"
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        return f"state.json: {_reason(e)}"
    if not (path / DCP_DIR).is_dir():
        return _legacy_problem(path)
    problem = _dcp_problem(path / DCP_DIR)
    if problem is not None:
        return problem
    world = meta.get("world_size", 1)
    for rank in range(world if isinstance(world, int) and world > 0 else 1):
        problem = _torch_file_problem(path / f"rng-{rank}.pt", load=True)
        if problem is not None:
            return problem
    return None


def _dcp_problem(dcp_dir: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(dcp_dir)).read_metadata().storage_data
    except Exception as e:  # a truncated pickle raises anything from EOFError up
        return f"{DCP_DIR}/.metadata: unreadable ({_reason(e)})"
    needed: dict[str, int] = {}
    for info in storage.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        try:
            size = (dcp_dir / name).stat().st_size
        except OSError:
            return f"{DCP_DIR}/{name}: missing"
        if size < end:
            return f"{DCP_DIR}/{name}: truncated ({size:,} of at least {end:,} bytes)"
    return None


def _legacy_problem(path: Path) -> str | None:
    """The format before DCP: trainable.safetensors + optimizer.pt + rng.pt."""
    weights = path / "trainable.safetensors"
    if not weights.is_file():
        return f"neither {DCP_DIR}/ nor trainable.safetensors"
    try:
        with weights.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        size = weights.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"trainable.safetensors: unreadable ({_reason(e)})"
    if size < 8 + header_len + max(ends, default=0):
        return f"trainable.safetensors: truncated ({size:,} bytes)"
    if (path / "optimizer.pt").exists():
        problem = _torch_file_problem(path / "optimizer.pt", load=False)
        if problem is not None:
            return problem
    return _torch_file_problem(path / "rng.pt", load=True)


def _torch_file_problem(path: Path, load: bool) -> str | None:
    """A ``torch.save`` file is a zip whose directory is written last: opening it finds
    a cut. ``load`` also unpickles it (the RNG files, a few KB)."""
    import zipfile

    name = path.name
    if not path.is_file():
        return f"{name}: missing"
    try:
        with zipfile.ZipFile(path):
            pass
        if load:
            torch.load(path, weights_only=False)
    except Exception as e:
        return f"{name}: unreadable ({_reason(e)})"
    return None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def trainable_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's state dict (sharded under FSDP) holding only trainable parameters,
    each shared tensor once, plus persistent buffers.

    ``ignore_frozen_params`` alone is not enough: it drops a frozen parameter under its
    first name only, so the second name of a tied one stays, and a LoRA checkpoint
    carried the whole frozen vocabulary as ``lm_head.weight``. A trained tied weight is
    kept under its first name; loading it there sets the shared tensor.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    for name in unsaved_param_names(model):
        state.pop(name, None)
    return state


def unsaved_param_names(model: nn.Module) -> set[str]:
    """State-dict names of frozen parameters and of second names of shared ones."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {_state_dict_name(n) for n in frozen.union(placement.duplicate_param_names(model))}


# Module names that wrappers insert and that DCP's state-dict names leave out.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _state_dict_name(param_name: str) -> str:
    return ".".join(part for part in param_name.split(".") if part not in _WRAPPER_PARTS)


@contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is a normal run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _has_optimizer_state(dcp_dir: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    return any(key.startswith("optim.") for key in keys)


def _load_legacy(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The format before DCP: trainable.safetensors + optimizer.pt + rng.pt."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters this model lacks: {missing[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _TorchRanks:
    """``atomic.Ranks`` over torchrun's process group (this process alone when off)."""

    def __init__(self, info: dist_utils.DistInfo) -> None:
        self.info = info

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def share(self, value: str | None) -> str:
        return str(dist_utils.broadcast_from_main(value) if self.info.enabled else value)

    def all_succeeded(self, ok: bool) -> bool:
        if not self.info.enabled:
            return ok
        import torch.distributed as dist

        oks: list[object] = [None] * self.info.world_size
        dist.all_gather_object(oks, ok)
        return all(oks)

    def barrier(self) -> None:
        if self.info.enabled:
            dist_utils.barrier()
