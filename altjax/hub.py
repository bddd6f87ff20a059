"""Hugging Face Hub ids where altjax takes a model directory: ``org/name`` -> a local snapshot.

Everything that reads a model or processor directory (``from_pretrained``, the CLIs, the model
and tokenizer keys of a training config) goes through :func:`resolve`: an existing local path (or
a remote ``gs://`` one) is returned as it is; a path that does not exist but reads as a Hub repo
id (``org/name``, as ``huggingface_hub.utils.validate_repo_id`` accepts it) is fetched with
``huggingface_hub.snapshot_download`` into the Hub cache, only the files the caller selects from
the repo's listing, and the snapshot directory is returned. A revision (branch, tag or commit)
and a cache directory pass through.

Offline (``HF_HUB_OFFLINE`` set, or the Hub unreachable) the snapshot is looked up in the cache;
one that is not there is a :class:`HubError` naming the id, the cache and what to do. Every
expected failure (no such repo, a gated one, no such revision, not cached offline) is a
``HubError``, a ``ValueError``: callers turn it into their own one-line error.

This module is at the bottom of altjax's layers, beside ``fsutil``: the processors (``processing``)
and the model I/O (``model_io``) both resolve ids through it.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from altjax import fsutil

DEFAULT_REVISION = "main"


class HubError(ValueError):
    """A Hub id that does not give a local directory: unknown, gated, or not cached offline."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id ``org/name`` (not a URI, one slash, valid characters)."""
    if fsutil.is_remote(name) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    # huggingface_hub reads the variable once, when it is imported; a process that sets it later
    # (a notebook, a test, a launcher importing altjax first) expects it honoured all the same.
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def resolve(name_or_path: str | os.PathLike, *, select: Callable[[Sequence[str]], list[str]],
            markers: Sequence[str], revision: Optional[str] = None,
            cache_dir: Optional[str | os.PathLike] = None, what: str = "model") -> str:
    """A local directory for ``name_or_path``: the path itself when it exists, is remote or is not
    a Hub id (the caller then reports it missing as before); else the snapshot of the Hub repo.

    Online, ``select(files)`` picks from the repo's file listing the files to fetch; offline (or
    when the Hub cannot be reached) the snapshot is the cached one holding the first of
    ``markers`` found. ``revision`` (default ``main``) and ``cache_dir`` (default the Hub cache,
    ``HF_HUB_CACHE``) apply to Hub ids only. ``what`` names the thing in error messages.
    Raises :class:`HubError`.
    """
    path = os.fspath(name_or_path)
    if fsutil.is_remote(path) or os.path.exists(path) or not is_hub_id(path):
        return path
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    where = path + (f" (revision {revision})" if revision else "")
    if offline():
        command = f"hf download {path}" + (f" --revision {revision}" if revision else "")
        return _cached(path, markers, revision, cache_dir, where, what,
                       f"HF_HUB_OFFLINE is set; download it with network access ({command}) or unset HF_HUB_OFFLINE")
    try:
        files = huggingface_hub.HfApi().list_repo_files(path, revision=revision)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        problem = ("holds it gated: accept its terms on the Hub and log in (hf auth login)"
                   if isinstance(e, GatedRepoError) else
                   "has no repo of that id that this login can read (check the path or the id)")
        raise HubError(f"{path}: no such local directory, and the Hugging Face Hub {problem}") from None
    except RevisionNotFoundError:
        raise HubError(f"{path}: the Hugging Face Hub repo has no revision {revision!r}") from None
    except Exception as e:  # noqa: BLE001 - network failures take many types; the cache may still hold it
        return _cached(path, markers, revision, cache_dir, where, what,
                       f"the Hub could not be reached ({_one_line(e)}); retry with network access")
    wanted = select(files)
    if not wanted:
        raise HubError(f"{where}: the Hugging Face Hub repo holds no {what} files altjax reads "
                       f"(it has {', '.join(sorted(files)[:8]) or 'no files'})")
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, cache_dir=cache_dir, allow_patterns=wanted)
    except Exception as e:  # noqa: BLE001 - as above: the download failed midway
        return _cached(path, markers, revision, cache_dir, where, what,
                       f"downloading it failed ({_one_line(e)}); retry with network access")


def _cached(repo_id: str, markers: Sequence[str], revision: Optional[str], cache_dir: Optional[str],
            where: str, what: str, why: str) -> str:
    for marker in markers:
        file = huggingface_hub.try_to_load_from_cache(repo_id, marker, cache_dir=cache_dir,
                                                      revision=revision or DEFAULT_REVISION)
        if isinstance(file, str):
            return os.path.dirname(file)
    cache = cache_dir or constants.HF_HUB_CACHE
    raise HubError(f"{where}: no such local directory, and the {what} is not in the local Hugging Face cache "
                   f"{cache}: {why}")


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return (text or type(error).__name__)[:300]
