"""Checks of a job made before any data or model work, shared by `vlmtune train`, `plan`
and the server's job submission: the model resolves, the data files exist and hold
something, ``lora.target_modules`` names layers the model has, and the machine has what
the job asks for."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.config import JobFile

if TYPE_CHECKING:
    from vlmtune.models.registry import ModelSpec


def data_file_problems(key: str, value: str | None) -> list[str]:
    """A data file that is missing, a folder or empty, found before the model loads."""
    if value is None:
        return []
    path = Path(value)
    if path.is_dir():
        return [f"{key}: {value} is a folder, not a JSONL file"]
    if not path.is_file():
        return [f"{key}: {value} does not exist"]
    if path.stat().st_size == 0:
        return [f"{key}: {value} is empty (0 bytes): nothing to train on"]
    return []


def lora_target_problems(job: JobFile) -> list[str]:
    """``lora.target_modules`` that name no linear of the parts that train, found from a
    meta-device model built from config.json, before any weights load.

    Skipped where only a download would tell (an uncached hub id) and for a saved
    adapter, whose own targets win over ``[lora]``.
    """
    from vlmtune.models.adapters import lora_target_regex
    from vlmtune.models.loading import (
        BuildOptions,
        ModelNotFoundError,
        build_model,
        resolve_model_path,
    )

    try:
        path = resolve_model_path(job.job.model, revision=job.job.revision)
    except (ModelNotFoundError, ValueError):  # uncached (ModelNotCachedError) or reported
        return []
    if (path / "adapter_config.json").is_file() or not (path / "config.json").is_file():
        return []
    model = build_model(path, "full", BuildOptions(structure_only=True))
    m = job.model
    try:
        lora_target_regex(model, job.lora.target_modules, m.freeze_vision_tower, m.freeze_projector)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if _linear(mod)})
        return [f"lora.target_modules: {e}; this model's linear layers: {', '.join(names)}"]
    return []


def _linear(module: object) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)


def check_model(job: JobFile) -> tuple[ModelSpec | None, list[str], bool]:
    """(the model's spec if known, its problems, whether it still has to be downloaded).

    Resolves ``job.model`` as training will, without downloading: an unknown name, a
    missing directory or, with HF_HUB_OFFLINE=1, an uncached hub id is refused here.
    """
    from vlmtune.models.loading import (
        ModelNotCachedError,
        ModelNotFoundError,
        hub_repo_id,
        resolve_model_path,
    )
    from vlmtune.models.registry import get_model_spec, spec_from_dir

    model, revision = job.job.model, job.job.revision
    if revision is not None and hub_repo_id(model) is None:
        problem = (
            f"job.revision: {revision!r} pins a Hugging Face hub id, and job.model = {model!r} "
            "is a local model (remove job.revision)"
        )
        return None, [problem], False
    try:
        path = resolve_model_path(model, revision=revision)
    except ModelNotCachedError:  # a hub id: `vlmtune train` downloads it after the checks
        path = None
    except (ModelNotFoundError, ValueError) as e:
        return None, [f"job.model: {e}"], False
    try:
        return get_model_spec(model), [], path is None
    except (KeyError, ValueError):
        pass
    if path is None or (path / "adapter_config.json").is_file():
        return None, [], path is None  # an adapter's base is resolved when it loads
    if not (path / "config.json").is_file():
        return None, [f"job.model: {path} has no config.json (nor adapter_config.json)"], False
    try:
        return spec_from_dir(path), [], False
    except (KeyError, ValueError) as e:
        return None, [f"job.model: {e}"], False


def check_compute(
    job: JobFile,
    procs_per_node: int | None = None,
    *,
    download: bool = False,
    machine: bool = True,
) -> list[str]:
    """Problems the machine or the model family rules out, found before any work.

    ``procs_per_node``: ``--nproc`` (default: ``[compute] gpu_count``, or torchrun's
    LOCAL_WORLD_SIZE inside a launched process). ``download``: fetch a hub model missing
    from the cache once everything else checks out, so that the processes torchrun
    starts find it cached (a ``--dry-run`` does not). ``machine``: include what this
    machine lacks (``machine_problems``).
    """
    spec, problems, pending_download = check_model(job)
    if machine:
        problems += machine_problems(job, procs_per_node)
    per_node = processes_per_node(job, procs_per_node)
    if spec is not None and spec.min_gpus > per_node * job.compute.nodes:
        problems.append(
            f"job.model: {spec.name} needs at least {spec.min_gpus} GPUs; compute asks for "
            f"{per_node * job.compute.nodes}"
        )
    for key in ("data", "validation_data"):
        problems += data_file_problems(f"job.{key}", getattr(job.job, key))
    if job.finetune_mode != "full" and not problems:
        problems += lora_target_problems(job)
    if download and pending_download and not problems:
        from vlmtune.models.loading import ModelNotFoundError, resolve_model_path

        try:
            resolve_model_path(job.job.model, revision=job.job.revision, download=True)
        except (ModelNotFoundError, ValueError) as e:
            problems.append(f"job.model: {e}")
    return problems


def processes_per_node(job: JobFile, procs_per_node: int | None) -> int:
    """``--nproc``, else torchrun's LOCAL_WORLD_SIZE inside a launched process, else gpu_count."""
    import os

    from vlmtune.engine.distributed import already_launched

    if procs_per_node is not None:
        return procs_per_node
    if already_launched():
        return int(os.environ.get("LOCAL_WORLD_SIZE", job.compute.gpu_count))
    return job.compute.gpu_count


def machine_problems(job: JobFile, procs_per_node: int | None) -> list[str]:
    """What this machine lacks for the job (GPUs, CUDA, packages).

    Kept apart from the job's own problems so that ``--dry-run`` and ``vlmtune plan``
    show a GPU job's plan on a laptop, listing these as notes instead of refusing.
    """
    import importlib.util

    import torch

    from vlmtune.engine.distributed import already_launched

    problems: list[str] = []
    c = job.compute
    launched = already_launched()
    per_node = processes_per_node(job, procs_per_node)
    on_cpu = c.gpu_type == "cpu" or job.training.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and c.gpu_count > 1 and c.gpu_type != "cpu" and procs_per_node is None:
        if not launched:
            problems.append(
                f"compute.gpu_count: {c.gpu_count} GPUs per node asked for, but this machine has "
                "no CUDA GPU (or training.device is cpu); pass --nproc N to train on N CPU "
                "processes, or set gpu_count = 1"
            )
    elif not on_cpu and per_node > torch.cuda.device_count():
        problems.append(
            f"compute.gpu_count: {per_node} processes per node need as many GPUs; this machine "
            f"has {torch.cuda.device_count()}"
        )
    if job.algorithm.variety == "qlora":
        if not torch.cuda.is_available():
            problems.append(
                "algorithm.variety: qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and "
                "this machine has none; `vlmtune plan` shows the plan here, and "
                'training.use_qlora = false (or variety = "lora") trains LoRA on the CPU'
            )
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                "algorithm.variety: qlora needs the bitsandbytes package "
                "(pip install 'vlmtune[qlora]')"
            )
    if job.training.attention == "flash_attention_2":
        if on_cpu:
            problems.append("training.attention: flash_attention_2 needs a CUDA GPU; use sdpa")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "training.attention: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation), or use sdpa"
            )
    if c.cpu_offload and on_cpu:
        problems.append(
            "compute.cpu_offload: offloads GPU memory to the host; on the CPU everything is "
            "already in host memory (remove it, or set it only on a machine with CUDA GPUs)"
        )
    return problems
