"""Model directories on disk: what they hold, how they are recognised, how they are written.

An **HF directory** holds ``config.json`` and its weights as ``model.safetensors``, sharded
safetensors (``model.safetensors.index.json`` + ``model-0000i-of-0000n.safetensors``), or
``pytorch_model.bin`` (``altjax.model_io.hf_weights`` reads and writes them). An **altjax
directory** holds the same ``config.json``, the parameters and BatchNorm statistics as an orbax
checkpoint under ``params/`` (``altjax.model_io.orbax_params``), and the processor files
(tokenizer, image processor config) copied from where the model came from.

Both kinds are written atomically (``atomic_directory``): into a temporary sibling directory,
renamed into place when complete, so a failure never leaves a partial checkpoint behind.
Overwriting replaces only what altjax itself wrote (``is_altjax_output``: judged by content; the
safetensors altjax writes say so in their header metadata), never the model's source or a
directory above it (``check_replaceable``). What is written gets the modes the umask gives
(``altjax.fsutil``).

The output path may be remote (``gs://...``, through ``etils.epath``): the directory is written
into a local temporary directory, then uploaded and put in place by
``fsutil.publish_remote_dir``, with ``config.json`` last (an object store moves a directory one
object at a time; a reader never sees a ``config.json`` beside missing weights). Reading
(``read_config``, ``from_pretrained``) needs a local directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from etils import epath

from altjax import fsutil, hub
from altjax.model_io.safetensors_io import read_metadata
from altjax.processing import PROCESSOR_FILES

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
ALTJAX_PARAMS_DIR = "params"
# Written into the header metadata of every safetensors file altjax writes (transformers reads only
# "format"), so that --overwrite can tell an HF directory altjax wrote from anyone else's.
WRITER_METADATA = {"format": "pt", "writer": "altjax"}
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# What orbax writes at the top of a (non-OCDBT or OCDBT) checkpoint directory, besides one
# directory per array.
ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "commit_success.txt", "manifest.ocdbt")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, unreadable or of the wrong kind."""


# --- Hub ids --------------------------------------------------------------------------------------

# The weights of a Hub repo that are fetched, first kind present wins (as ``open_weights`` reads
# them): a repo often holds the same weights as safetensors and as pytorch_model.bin.
HUB_WEIGHTS = (
    (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, SHARD_NAME),
    (BIN_WEIGHTS_NAME, BIN_INDEX_NAME, re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin")),
)


def hub_model_files(files: Sequence[str]) -> list[str]:
    """The files of a Hub repo's listing that altjax reads: ``config.json``, one kind of weights
    (safetensors, else .bin; or an altjax directory's ``params/``) and the processor files."""
    wanted = [f for f in files if f == CONFIG_NAME or f in PROCESSOR_FILES]
    for single, index, shard in HUB_WEIGHTS:
        weights = [f for f in files if f in (single, index) or shard.fullmatch(f)]
        if weights:
            return wanted + weights
    return wanted + [f for f in files if f.startswith(ALTJAX_PARAMS_DIR + "/")]


def model_dir(name_or_path: str | os.PathLike, *, revision: Optional[str] = None,
              cache_dir: Optional[str | os.PathLike] = None) -> str:
    """The local model directory of ``name_or_path``: itself, or the snapshot of a Hugging Face Hub
    id (``org/name``) in the Hub cache (``altjax.hub``); ``CheckpointError`` when an id cannot be
    had (unknown, gated, not cached offline)."""
    try:
        return hub.resolve(name_or_path, select=hub_model_files, markers=(CONFIG_NAME,), revision=revision,
                           cache_dir=cache_dir, what="model")
    except hub.HubError as e:
        raise CheckpointError(str(e)) from None


# --- config.json ----------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF (or altjax) model directory or of a Hub id (``model_dir``), as a dict."""
    path = model_dir(path)
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json in the model directory")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def check_model_type(config: Mapping[str, Any], expected: str | tuple[str, ...], source: str) -> None:
    """Raises ``CheckpointError`` unless ``config["model_type"]`` is ``expected`` (or one of them)."""
    allowed = (expected,) if isinstance(expected, str) else tuple(expected)
    got = config.get("model_type")
    if got not in allowed:
        want = " or ".join(repr(a) for a in allowed)
        raise CheckpointError(f"{source}: model_type is {got!r}, expected {want}")


def is_altjax_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an altjax directory (orbax parameters under ``params/``)."""
    return os.path.isdir(os.path.join(path, ALTJAX_PARAMS_DIR))


# --- writing atomically, replacing only what altjax wrote -----------------------------------------


def is_altjax_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory altjax wrote and nothing else was put into since, judged by
    its content: an altjax directory (``config.json``, orbax ``params/``, processor files) or an
    HF directory written by ``save_pretrained(format="hf")`` / ``altjax-convert to-hf``
    (``config.json``, safetensors whose header metadata names altjax as the writer, their index,
    processor files). An empty directory counts too: there is nothing in it to lose. ``path`` may
    be remote (a store has no symbolic links)."""
    path = os.fspath(path)
    if fsutil.is_remote(path):
        if not epath.Path(path).is_dir():
            return False
        names = {p.name for p in epath.Path(path).iterdir()}
        isfile, isdir = (lambda p: epath.Path(p).is_file()), (lambda p: epath.Path(p).is_dir())
        metadata = read_metadata
    else:
        if os.path.islink(path) or not os.path.isdir(path):
            return False
        names = set(os.listdir(path))
        isfile, isdir = os.path.isfile, (lambda p: not os.path.islink(p) and os.path.isdir(p))
        metadata = read_metadata
    if not names:
        return True
    if not isfile(os.path.join(path, CONFIG_NAME)):
        return False
    others = names - {CONFIG_NAME, *PROCESSOR_FILES}
    if ALTJAX_PARAMS_DIR in others:
        params = os.path.join(path, ALTJAX_PARAMS_DIR)
        return (others == {ALTJAX_PARAMS_DIR} and isdir(params)
                and any(isfile(os.path.join(params, f)) for f in ORBAX_FILES))
    weights = {n for n in others if n == SAFE_WEIGHTS_NAME or SHARD_NAME.fullmatch(n)}
    if not weights or others - weights - {SAFE_INDEX_NAME}:
        return False
    return all((metadata(os.path.join(path, n)) or {}).get("writer") == WRITER_METADATA["writer"]
               for n in weights)


def check_replaceable(out: str | os.PathLike, *, sources: tuple = (),
                      owned: Callable[[str], bool] = is_altjax_output) -> str:
    """Checks that ``out`` may be replaced by a new output (``--overwrite``); returns its absolute
    path as the kernel resolves it (``fsutil.output_path``), the path to write.

    Nothing at ``out``, or an empty directory: fine. Otherwise ``out`` must be a directory (not a
    file, not a symbolic link) for which ``owned(path)`` holds (default: ``is_altjax_output``), and
    must be neither one of ``sources`` nor any directory above one (compared after resolving
    symbolic links, and by device and inode). Raises ``CheckpointError`` (one line: what, where,
    what to do) otherwise. A remote ``out`` is checked the same way, its sources by name, and
    returned normalised.
    """
    if fsutil.is_remote(out):
        return _check_replaceable_remote(str(epath.Path(out)), sources, owned)
    path = fsutil.output_path(out)
    if not os.path.lexists(path):
        return path
    if os.path.islink(path):
        raise CheckpointError(f"{path}: is a symbolic link; not replacing it (remove the link or choose another output path)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: is a file altjax did not write; not replacing it "
                              "(remove it yourself or choose another output path)")
    here = os.stat(path)
    for source in sources:
        if source is None:
            continue
        source = os.path.realpath(os.fspath(source))
        walk = source
        while True:
            try:
                st = os.stat(walk)
                same = (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)
            except OSError:
                same = False
            if same or walk == path:
                what = "is the source directory" if walk == source else f"contains the source {source}"
                raise CheckpointError(f"{path}: {what}; not replacing it (write the output somewhere else)")
            parent = os.path.dirname(walk)
            if parent == walk:
                break
            walk = parent
    names = sorted(os.listdir(path))
    if names and not owned(path):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointError(f"{path}: exists and is not an output altjax wrote (it holds {shown}); not replacing it "
                              "(remove it yourself or choose another output path)")
    return path


def _check_replaceable_remote(path: str, sources: tuple, owned: Callable[[str], bool]) -> str:
    target = epath.Path(path)
    if not target.exists():
        return path
    if not target.is_dir():
        raise CheckpointError(f"{path}: is a file altjax did not write; not replacing it "
                              "(remove it yourself or choose another output path)")
    for source in sources:
        # A local source cannot be inside a store; a remote one is compared by name.
        if source is None or not fsutil.is_remote(source):
            continue
        source = str(epath.Path(source))
        if source == path or source.startswith(path + "/"):
            what = "is the source directory" if source == path else f"contains the source {source}"
            raise CheckpointError(f"{path}: {what}; not replacing it (write the output somewhere else)")
    names = sorted(p.name for p in target.iterdir())
    if names and not owned(path):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointError(f"{path}: exists and is not an output altjax wrote (it holds {shown}); not replacing it "
                              "(remove it yourself or choose another output path)")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, sources: tuple = (),
                     owned: Callable[[str], bool] = is_altjax_output) -> Iterator[str]:
    """Yields a temporary directory beside ``path``; renames it to ``path`` when the block succeeds.

    On any error the temporary directory is removed and ``path`` is untouched. An existing
    ``path`` is an error unless ``overwrite``; even then it is replaced only if
    ``check_replaceable(path, sources=sources, owned=owned)`` allows it (a directory altjax wrote,
    not holding any of ``sources``), and only once the new directory is complete. The new
    directory and everything in it get the permissions the umask gives (not mkdtemp's 0700).
    A remote ``path``: the temporary directory is a local one, published as the module docstring
    says.
    """
    if fsutil.is_remote(path):
        with _remote_directory(str(epath.Path(path)), overwrite=overwrite, sources=sources, owned=owned) as tmp:
            yield tmp
        return
    if os.path.lexists(fsutil.output_path(path)) and not overwrite:
        raise CheckpointError(f"{fsutil.output_path(path)}: output path exists (choose another path or pass overwrite)")
    path = check_replaceable(path, sources=sources, owned=owned)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: the output's parent directory does not exist")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        fsutil.apply_umask(tmp)
        check_replaceable(path, sources=sources, owned=owned)  # again: the block may have taken long
        fsutil.replace_path(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _remote_directory(path: str, *, overwrite: bool, sources: tuple, owned: Callable[[str], bool]) -> Iterator[str]:
    if epath.Path(path).exists() and not overwrite:
        raise CheckpointError(f"{path}: output path exists (choose another path or pass overwrite)")
    check_replaceable(path, sources=sources, owned=owned)
    tmp = tempfile.mkdtemp(prefix=f"altjax-{os.path.basename(path)}.tmp-")
    try:
        yield tmp
        check_replaceable(path, sources=sources, owned=owned)  # again: the block may have taken long
        fsutil.publish_remote_dir(tmp, path, last=(CONFIG_NAME,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(file: str, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_processor_files(src: Optional[str], dst: str) -> list[str]:
    """Copies the tokenizer and image-processor files of ``src`` (if any; it may be remote) into
    the local directory ``dst``."""
    copied = []
    if src and fsutil.is_remote(src):
        if epath.Path(src).is_dir():
            present = {p.name for p in epath.Path(src).iterdir()}  # one listing, not a request per name
            for name in PROCESSOR_FILES:
                if name in present:
                    (epath.Path(src) / name).copy(os.path.join(dst, name))
                    copied.append(name)
        return copied
    if src and os.path.isdir(src):
        for name in PROCESSOR_FILES:
            file = os.path.join(src, name)
            if os.path.isfile(file):
                shutil.copy2(file, os.path.join(dst, name))
                copied.append(name)
    return copied
