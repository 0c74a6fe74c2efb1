"""Hugging Face hub ids: found in the local cache, or downloaded once on first use.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_HUB_OFFLINE``
once, when it is first imported; the helpers here read them at each call, so a variable
set after that import (by a launcher, a notebook, a test) still applies. ``HF_TOKEN`` is
left to huggingface_hub, which reads it for every request.

A cached snapshot is used as it is, without asking the hub whether the branch moved:
a run reads the same weights every time, and a cached model works offline. Pin
``job.revision`` to a commit to make that explicit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What loading a Qwen3-VL checkpoint reads: config and generation config, safetensors
# shards and their index, tokenizer, processor and chat template. Not the .bin / .pth /
# .gguf copies some repos also carry (they double or triple the download).
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model")

_TRUE = ("1", "ON", "YES", "TRUE")


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a local directory nor a hub id vlmtune can find or fetch."""


class ModelNotCachedError(ModelNotFoundError):
    """A hub id missing from the cache that a download could fetch (none was asked for)."""


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would pick if it read the environment now."""
    from huggingface_hub import constants

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, else as at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value.upper() in _TRUE if value is not None else constants.HF_HUB_OFFLINE


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot directory of ``repo_id``, or None if absent or incomplete.

    An interrupted download leaves a snapshot folder with files missing; huggingface_hub
    then raises ``IncompleteSnapshotError`` (a ``LocalEntryNotFoundError``), and the
    caller's download resumes it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hub_cache_dir(),
            local_files_only=True,
            allow_patterns=list(HUB_FILE_PATTERNS),
        )
    except (LocalEntryNotFoundError, ValueError, OSError):  # ValueError: not a valid repo id
        return None
    return Path(folder)


def describe(repo_id: str, revision: str | None) -> str:
    return f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def snapshot_dir(repo_id: str, revision: str | None, *, download: bool, looked: str) -> Path:
    """The local directory of a hub model; with ``download``, fetched if not cached.

    ``looked`` says what the caller already tried (the directory it checked); every
    error message starts with it, then names the hub id and the cache.
    """
    found = cached_snapshot(repo_id, revision)
    if found is not None:
        return found
    where = (
        f"{looked}, and {describe(repo_id, revision)} is not in the Hugging Face cache "
        f"({hub_cache_dir()})"
    )
    if hub_offline():
        raise ModelNotFoundError(
            f"{where} and offline mode is on (HF_HUB_OFFLINE=1): download it on a machine "
            f"with network access (`hf download {repo_id}`), or unset HF_HUB_OFFLINE"
        )
    if not download:
        raise ModelNotCachedError(
            f"{where}. Fetch it first with `huggingface-cli download {repo_id}` (or "
            f"`hf download {repo_id}`), or pass the path of a checkpoint directory."
        )
    return _download(repo_id, revision, looked)


def _download(repo_id: str, revision: str | None, looked: str) -> Path:
    """Fetch a snapshot, one process per cache at a time; the others wait, then reuse it.

    Under torchrun every local rank may get here at once: the first takes the lock and
    downloads (with huggingface_hub's progress bars), the rest block on the lock and
    then find the snapshot cached. An interrupted download resumes from its
    ``.incomplete`` blobs the next time.
    """
    from huggingface_hub import snapshot_download

    with _exclusive(hub_cache_dir() / ".locks" / f"vlmtune--{repo_id.replace('/', '--')}.lock"):
        found = cached_snapshot(repo_id, revision)  # another process finished it meanwhile
        if found is not None:
            return found
        print(
            f"downloading {describe(repo_id, revision)} from {hub_endpoint()} "
            f"into {hub_cache_dir()}",
            file=sys.stderr,
        )
        try:
            folder = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=hub_cache_dir(),
                endpoint=hub_endpoint(),
                allow_patterns=list(HUB_FILE_PATTERNS),
            )
        except Exception as e:  # every hub, network or disk failure: one message, no traceback
            raise ModelNotFoundError(
                f"{looked}, and {describe(repo_id, revision)} could not be downloaded from "
                f"{hub_endpoint()} into {hub_cache_dir()}: {download_failure(e, revision)}"
            ) from e
    return Path(folder)


def download_failure(error: Exception, revision: str | None) -> str:
    """What went wrong with a download, in words a user can act on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return (
            "the repository is gated: accept its terms on the model page, then set HF_TOKEN "
            "(or run `hf auth login`)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            "no such repository (check the name; a private one needs HF_TOKEN or `hf auth login`)"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"the repository has no revision {revision!r} (job.revision)"
    if isinstance(error, LocalEntryNotFoundError):
        return "the hub could not be reached (check the network, a proxy, or HF_ENDPOINT)"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        return f"the hub answered HTTP {status}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), mode=0o664)  # group-writable: a shared cache
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(
            f"waiting for another process downloading into {lock_path.parent.parent}",
            file=sys.stderr,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
