"""Model directories on disk: Hugging Face checkpoints and altjax (orbax) checkpoints.

An **HF directory** holds ``config.json`` and its weights as ``model.safetensors``, sharded
safetensors (``model.safetensors.index.json`` + ``model-0000i-of-0000n.safetensors``), or
``pytorch_model.bin`` (torch is needed for that one only). Tensors are read lazily, one at a time,
so loading holds about one copy of the model in memory.

An **altjax directory** holds the same ``config.json``, the parameters and BatchNorm statistics as
an orbax checkpoint under ``params/``, and the processor files (tokenizer, image processor config)
copied from where the model came from. It can be restored straight into a mesh sharding.

Both kinds are written atomically: into a temporary sibling directory, renamed into place when
complete, so a failure never leaves a partial checkpoint behind. Overwriting replaces only what
altjax itself wrote (``is_altjax_output``: judged by content; the safetensors altjax writes say so
in their header metadata), never the model's source or a directory above it
(``check_replaceable``). What is written gets the modes the umask gives (``altjax.fsutil``).

An altjax directory is read with tensorstore, one array at a time as it is loaded, after checking
that every array and chunk file is there: a damaged directory is reported on one line naming the
file or the missing array.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from altjax import fsutil
from altjax.progress import Progress
from altjax.safetensors_io import SafetensorsError, SafetensorsReader, read_metadata, write_safetensors

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
ALTJAX_PARAMS_DIR = "params"
# Tokenizer and image-processor files a model directory may carry; copied along with the weights.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
)
# transformers 5's default: one file up to 50 GB.
DEFAULT_MAX_SHARD_SIZE = "50GB"
# Written into the header metadata of every safetensors file altjax writes (transformers reads only
# "format"), so that --overwrite can tell an HF directory altjax wrote from anyone else's.
WRITER_METADATA = {"format": "pt", "writer": "altjax"}
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# What orbax writes at the top of a (non-OCDBT or OCDBT) checkpoint directory, besides one
# directory per array.
ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "commit_success.txt", "manifest.ocdbt")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, unreadable or of the wrong kind."""


# --- config.json ------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF (or altjax) model directory, as a dict."""
    path = os.fspath(path)
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


# --- reading HF weights lazily ----------------------------------------------------------------


class SafetensorsFile(SafetensorsReader):
    """A lazy mapping over one ``.safetensors`` file (``altjax.safetensors_io``), with its errors
    reported as ``CheckpointError``. Each tensor is read from disk when it is looked up."""

    def __init__(self, file: str | os.PathLike):
        try:
            super().__init__(file)
        except (OSError, SafetensorsError) as e:
            raise CheckpointError(f"{os.fspath(file)}: not a readable safetensors file "
                                  f"({str(e).removeprefix(os.fspath(file) + ': ')})") from None

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return super().__getitem__(key)
        except (OSError, SafetensorsError) as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {key!r} ({str(e).removeprefix(self.file + ': ')})") from None


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; ml_dtypes (a jax dependency) does
        import ml_dtypes

        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class TorchBinFile(Mapping[str, np.ndarray]):
    """A ``pytorch_model.bin`` as a mapping; memory-mapped, so tensors are paged in as they are read."""

    def __init__(self, file: str | os.PathLike):
        self.file = os.fspath(file)
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{self.file}: reading pytorch_model.bin needs torch; "
                                  "install torch or convert the directory to safetensors") from None
        try:
            state = torch.load(self.file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{self.file}: not a readable PyTorch checkpoint ({e})") from None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{self.file}: expected a state dict, got {type(state).__name__}")
        self._state = dict(state)

    def __getitem__(self, key: str) -> np.ndarray:
        return _torch_to_numpy(self._state[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return _torch_to_numpy(self._state[key].reshape(-1)[:0]).dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class ShardedWeights(Mapping[str, np.ndarray]):
    """Several weight files behind an index (``weight_map``: key -> file), each opened on first use."""

    def __init__(self, index_file: str, opener: Callable[[str], Mapping[str, np.ndarray]]):
        self.file = index_file
        try:
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a valid weight index ({e!r})") from None
        folder = os.path.dirname(index_file)
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
            raise CheckpointError(f"{index_file}: lists shard files that do not exist: {', '.join(missing)}")
        self._weight_map: dict[str, str] = dict(weight_map)
        self._folder, self._opener = folder, opener
        self._open: dict[str, Mapping[str, np.ndarray]] = {}

    def _shard(self, key: str) -> Mapping[str, np.ndarray]:
        name = self._weight_map[key]
        if name not in self._open:
            self._open[name] = self._opener(os.path.join(self._folder, name))
        shard = self._open[name]
        if key not in shard:
            raise CheckpointError(f"{self.file}: maps {key!r} to {name}, which does not contain it")
        return shard

    def __getitem__(self, key: str) -> np.ndarray:
        return self._shard(key)[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shard(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._shard(key).dtype(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)


def open_weights(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The weights of an HF model directory as a lazy key -> array mapping.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json``,
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json``.
    """
    path = os.fspath(path)
    candidates = [
        (SAFE_WEIGHTS_NAME, SafetensorsFile),
        (SAFE_INDEX_NAME, lambda f: ShardedWeights(f, SafetensorsFile)),
        (BIN_WEIGHTS_NAME, TorchBinFile),
        (BIN_INDEX_NAME, lambda f: ShardedWeights(f, TorchBinFile)),
    ]
    for name, opener in candidates:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return opener(file)
    raise CheckpointError(f"{path}: no weights in the model directory (looked for "
                          f"{', '.join(name for name, _ in candidates)}, and {ALTJAX_PARAMS_DIR}/ of an altjax directory)")


def is_altjax_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an altjax directory (orbax parameters under ``params/``)."""
    return os.path.isdir(os.path.join(path, ALTJAX_PARAMS_DIR))


# --- writing atomically, replacing only what altjax wrote ------------------------------------


def is_altjax_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory altjax wrote and nothing else was put into since, judged by
    its content: an altjax directory (``config.json``, orbax ``params/``, processor files) or an
    HF directory written by ``save_pretrained(format="hf")`` / ``altjax-convert to-hf``
    (``config.json``, safetensors whose header metadata names altjax as the writer, their index,
    processor files). An empty directory counts too: there is nothing in it to lose."""
    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    if not names:
        return True
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return False
    others = names - {CONFIG_NAME, *PROCESSOR_FILES}
    if ALTJAX_PARAMS_DIR in others:
        params = os.path.join(path, ALTJAX_PARAMS_DIR)
        return (others == {ALTJAX_PARAMS_DIR} and not os.path.islink(params) and os.path.isdir(params)
                and any(os.path.isfile(os.path.join(params, f)) for f in ORBAX_FILES))
    weights = {n for n in others if n == SAFE_WEIGHTS_NAME or SHARD_NAME.fullmatch(n)}
    if not weights or others - weights - {SAFE_INDEX_NAME}:
        return False
    return all((read_metadata(os.path.join(path, n)) or {}).get("writer") == WRITER_METADATA["writer"]
               for n in weights)


def check_replaceable(out: str | os.PathLike, *, sources: tuple = (),
                      owned: Callable[[str], bool] = is_altjax_output) -> str:
    """Checks that ``out`` may be replaced by a new output (``--overwrite``); returns its absolute
    path as the kernel resolves it (``fsutil.output_path``), the path to write.

    Nothing at ``out``, or an empty directory: fine. Otherwise ``out`` must be a directory (not a
    file, not a symbolic link) for which ``owned(path)`` holds (default: ``is_altjax_output``), and
    must be neither one of ``sources`` nor any directory above one (compared after resolving
    symbolic links, and by device and inode). Raises ``CheckpointError`` (one line: what, where,
    what to do) otherwise.
    """
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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, sources: tuple = (),
                     owned: Callable[[str], bool] = is_altjax_output) -> Iterator[str]:
    """Yields a temporary directory beside ``path``; renames it to ``path`` when the block succeeds.

    On any error the temporary directory is removed and ``path`` is untouched. An existing
    ``path`` is an error unless ``overwrite``; even then it is replaced only if
    ``check_replaceable(path, sources=sources, owned=owned)`` allows it (a directory altjax wrote,
    not holding any of ``sources``), and only once the new directory is complete. The new
    directory and everything in it get the permissions the umask gives (not mkdtemp's 0700).
    """
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


def _write_json(file: str, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_processor_files(src: Optional[str], dst: str) -> list[str]:
    """Copies the tokenizer and image-processor files of ``src`` (if any) into ``dst``."""
    copied = []
    if src and os.path.isdir(src):
        for name in PROCESSOR_FILES:
            file = os.path.join(src, name)
            if os.path.isfile(file):
                shutil.copy2(file, os.path.join(dst, name))
                copied.append(name)
    return copied


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read size {size!r} (e.g. 5GB, 500MB)")
    number, unit = float(m.group(1)), m.group(2)
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * powers[unit])


def write_hf_weights(folder: str, tensors: Mapping[str, np.ndarray], *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     progress: bool = False) -> list[str]:
    """Writes ``tensors`` (key -> array, read lazily in order) as safetensors the way transformers does.

    One ``model.safetensors`` up to ``max_shard_size``; above it ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``. ``tensors`` must answer ``shape(key)`` and
    ``dtype(key)`` (the lazy converters do): each tensor is then produced, written and dropped in
    turn, so writing holds one tensor, not a copy of the model. Returns the file names written.
    """
    limit = parse_size(max_shard_size)
    keys = list(tensors)
    sizes = {k: math.prod(tensors.shape(k)) * np.dtype(tensors.dtype(k)).itemsize for k in keys}
    shards: list[list[str]] = [[]]
    filled = 0
    for k in keys:
        # As transformers: a tensor larger than the limit gets a shard of its own.
        if shards[-1] and filled + sizes[k] > limit:
            shards.append([])
            filled = 0
        shards[-1].append(k)
        filled += sizes[k]
    names = ([SAFE_WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    class Counted(Mapping[str, np.ndarray]):
        # Advances the progress line as the writer pulls each tensor.
        def __getitem__(self, k):
            value = tensors[k]
            bar.update(sizes[k])
            return value

        def __iter__(self):
            return iter(tensors)

        def __len__(self):
            return len(tensors)

        def shape(self, k):
            return tensors.shape(k)

        def dtype(self, k):
            return tensors.dtype(k)

    with Progress(sum(sizes.values()), "writing safetensors", unit="MB", scale=1e6, enabled=progress) as bar:
        for name, shard in zip(names, shards):
            write_safetensors(os.path.join(folder, name), Counted(), shard, metadata=WRITER_METADATA)
    if len(shards) > 1:
        _write_json(os.path.join(folder, SAFE_INDEX_NAME), {
            "metadata": {"total_size": sum(sizes.values()),
                         "total_parameters": sum(math.prod(tensors.shape(k)) for k in keys)},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        })
        names.append(SAFE_INDEX_NAME)
    return names


# --- whole models -----------------------------------------------------------------------------


def _sharding_of(mesh, rules):
    if mesh is None:
        return None
    from jax.sharding import NamedSharding

    from altjax import sharding

    rules = sharding.PARTITION_RULES if rules is None else rules

    def of(path: str, shape: tuple[int, ...]):
        return NamedSharding(mesh, sharding.partition_spec(path.replace(".", "/"), shape, mesh, rules))

    return of


def load_model(
    path: str | os.PathLike,
    *,
    model_type: str | tuple[str, ...],
    build: Callable[[dict[str, Any]], tuple[Any, Callable[[], Any]]],
    table: Callable[[Any], Any],
    seed: int = 0,
    mesh=None,
    rules=None,
    progress: bool = False,
) -> Any:
    """Loads an HF or altjax directory into a new NNX model without initialising random weights.

    ``build(config_dict)`` returns ``(config, make_model)`` where ``make_model()`` constructs the
    model; ``table(config)`` returns its conversion ``Table``. The model is built abstractly
    (``nnx.eval_shape``) and filled one tensor at a time. With a ``mesh``, every parameter is
    placed directly in its sharding (``altjax.sharding`` partition ``rules``), each device receiving
    only its own shard. The dropout RNG streams are seeded with ``seed``.
    """
    from flax import nnx

    from altjax.conversion import engine

    path = os.fspath(path)
    config_dict = read_config(path)
    check_model_type(config_dict, model_type, path)
    try:
        config, make_model = build(config_dict)
        model = nnx.eval_shape(make_model)
    except (ValueError, TypeError, KeyError) as e:  # a config the model cannot be built from
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
    shardings = _sharding_of(mesh, rules)
    if is_altjax_dir(path):
        params = _restore_orbax(os.path.join(path, ALTJAX_PARAMS_DIR), engine.model_shapes(model), shardings)
        engine.load_params(model, params, sharding=shardings, progress=progress)
    else:
        tensors = open_weights(path)
        params = engine.torch_to_nnx(tensors, table(config), engine.model_shapes(model),
                                     source=getattr(tensors, "file", path), lazy=True)
        engine.load_params(model, params, sharding=shardings, progress=progress)
    nnx.reseed(model, default=seed, dropout=seed)
    model.name_or_path = path
    return model


class _Consumed(Mapping[str, Any]):
    """A dict whose entries are dropped as they are read: each host array can be freed once its
    device copy exists."""

    def __init__(self, params: dict[str, Any]):
        self._params = params
        self._shapes = {k: tuple(np.shape(v)) for k, v in params.items()}

    def __getitem__(self, key: str) -> Any:
        return self._params.pop(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _check_against_model(directory: str, stored_shapes: Mapping[str, tuple[int, ...]],
                         shapes: Mapping[str, tuple[int, ...]]) -> None:
    from altjax.conversion.engine import ConversionError, problems_message

    missing = sorted(set(shapes) - set(stored_shapes))
    unexpected = sorted(set(stored_shapes) - set(shapes))
    bad = [f"{k}: checkpoint has {stored_shapes[k]}, the model expects {tuple(shapes[k])}"
           for k in shapes if k in stored_shapes and stored_shapes[k] != tuple(shapes[k])]
    message = problems_message([("missing parameters", missing), ("unexpected parameters", unexpected),
                                ("shape mismatches", bad)])
    if message:
        raise ConversionError(f"{directory} does not match the model: {message}")


def _tensorstore_error(e: BaseException) -> str:
    # tensorstore appends the whole JSON spec and source locations: the first clause says it all.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"\s*\[(tensorstore_spec|source locations)=.*$", "", message)


def _orbax_layout(directory: str) -> Optional[list[str]]:
    """The array names ``directory/_METADATA`` lists, when the checkpoint has the layout altjax
    writes (one zarr v2 array directory per parameter, no OCDBT); ``None`` for other orbax
    layouts (OCDBT, as altjax wrote before), which orbax itself restores."""
    file = os.path.join(directory, "_METADATA")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; the altjax directory is incomplete (export or convert it again)")
    try:
        with open(file, encoding="utf-8") as f:
            metadata = json.load(f)
        if metadata.get("use_ocdbt", True) or metadata.get("use_zarr3", False):
            return None
        names = []
        for entry in metadata["tree_metadata"].values():
            names.append(".".join(str(k["key"]) for k in entry["key_metadata"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the altjax directory is damaged") from None
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not orbax checkpoint metadata (no {e}); the altjax directory is damaged") from None
    return names


class _OrbaxArrays(Mapping[str, Any]):
    """The arrays of an orbax checkpoint as altjax writes it (zarr v2, one directory per array),
    read with tensorstore one array at a time as they are looked up: as host arrays, or with
    ``shardings`` straight into the mesh, each process reading only its devices' slices.

    Read synchronously, without orbax: orbax closes its asyncio loop as soon as one read fails
    while the others are still in flight, and each of them then prints an ``Event loop is
    closed`` traceback at exit."""

    def __init__(self, directory: str, names: list[str], shardings):
        import tensorstore as ts

        self.directory, self._shardings = directory, shardings
        for name in names:
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder):
                raise CheckpointError(f"{directory}: the array {name!r} is missing (no {name}/ directory); "
                                      "the altjax directory is incomplete (export or convert it again)")
        opening = {name: ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(directory, name) + "/"},
                                  "fill_missing_data_reads": False}, open=True, read=True) for name in names}
        self._stores = {}
        for name, future in opening.items():
            try:
                self._stores[name] = future.result()
            except Exception as e:
                raise CheckpointError(f"{os.path.join(directory, name)}: cannot open the array "
                                      f"({_tensorstore_error(e)}); the altjax directory is damaged") from None
        for name, store in self._stores.items():  # a chunk file gone is reported before anything is read
            if 0 in store.shape:
                continue
            chunks = store.chunk_layout.read_chunk_template.shape
            separator = store.spec().to_json().get("metadata", {}).get("dimension_separator") or "."
            grid = [range(-(-n // c)) for n, c in zip(store.shape, chunks)]
            for index in itertools.product(*grid):
                chunk = separator.join(map(str, index)) if index else "0"
                if not os.path.isfile(os.path.join(directory, name, chunk)):
                    raise CheckpointError(f"{os.path.join(directory, name, chunk)}: missing (a chunk of the array "
                                          f"{name!r}); the altjax directory is incomplete (export or convert it again)")

    def _read(self, name: str, index=()) -> np.ndarray:
        try:
            return self._stores[name][index].read().result()
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.directory, name)}: cannot read the array "
                                  f"({_tensorstore_error(e)}); the altjax directory is damaged") from None

    def __getitem__(self, name: str) -> Any:
        if name not in self._stores:
            raise KeyError(name)
        if not self._shardings:
            return self._read(name)
        import jax

        shape = self.shape(name)
        sharding = self._shardings(name, shape)
        by_device = sharding.addressable_devices_indices_map(shape)
        slices: dict[tuple, np.ndarray] = {}
        arrays = []
        for device, index in by_device.items():
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in slices:  # replicas read once
                slices[key] = self._read(name, index)
            arrays.append(jax.device_put(slices[key], device))
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._stores[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stores)

    def __len__(self) -> int:
        return len(self._stores)


def _restore_orbax(directory: str, shapes: Mapping[str, tuple[int, ...]], shardings) -> Mapping[str, Any]:
    directory = os.path.abspath(directory)
    names = _orbax_layout(directory)
    if names is None:
        return _Consumed(_restore_orbax_with_orbax(directory, shapes, shardings))
    arrays = _OrbaxArrays(directory, names, shardings)
    _check_against_model(directory, {k: arrays.shape(k) for k in arrays}, shapes)
    return arrays


def _restore_orbax_with_orbax(directory: str, shapes: Mapping[str, tuple[int, ...]], shardings) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)  # orbax resolves relative paths against nothing useful
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(directory)
        stored = _flatten(dict(getattr(metadata, "item_metadata", metadata)))
    except Exception as e:
        raise CheckpointError(f"{directory}: not a readable orbax checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") from None
    stored_shapes = {k: tuple(v.shape) for k, v in stored.items()}
    _check_against_model(directory, stored_shapes, shapes)
    if shardings:
        # Straight into the mesh: each device reads only its own slice.
        target = {k: jax.ShapeDtypeStruct(stored_shapes[k], stored[k].dtype, sharding=shardings(k, stored_shapes[k]))
                  for k in stored}
        args = ocp.args.PyTreeRestore(item=_nest(target), restore_args=_nest(
            {k: ocp.ArrayRestoreArgs(sharding=v.sharding) for k, v in target.items()}))
    else:
        # As host arrays, which load_params turns into device arrays one at a time, dropping each
        # host copy as it goes; restoring device arrays directly would hold both trees at once.
        target = {k: np.empty((0,), stored[k].dtype) for k in stored}
        args = ocp.args.PyTreeRestore(item=_nest(target), restore_args=_nest(
            {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in stored}))
    try:
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(directory, args=args)
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot restore the orbax checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") from None
    return _flatten(restored)


def save_model(
    model: Any,
    path: str | os.PathLike,
    *,
    format: str = "altjax",
    table: Callable[[Any], Any],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    source: Optional[str] = None,
    progress: bool = False,
) -> str:
    """Writes ``model`` (with ``model.config``) as an altjax or HF directory; returns its path.

    ``format="altjax"``: ``config.json``, orbax ``params/`` and the processor files of ``source``
    (default: the directory the model was loaded from). ``format="hf"``: ``config.json``,
    safetensors with the key spellings transformers 5 writes (sharded above ``max_shard_size``) and
    the processor files, loadable by transformers' ``from_pretrained``.
    """
    from altjax.conversion import engine

    if format not in ("altjax", "hf"):
        raise ValueError(f"format must be 'altjax' or 'hf', got {format!r}")
    source = source if source is not None else getattr(model, "name_or_path", None)
    variables = engine.model_variables(model)
    with atomic_directory(path, overwrite=overwrite, sources=(source,)) as tmp:
        _write_json(os.path.join(tmp, CONFIG_NAME), model.config.to_hf())
        if format == "altjax":
            _save_orbax(os.path.join(tmp, ALTJAX_PARAMS_DIR), {k: v.get_value() for k, v in variables.items()})
        else:
            tensors = engine.nnx_to_torch(engine.LazyVariables(variables), table(model.config), on_disk=True, lazy=True)
            write_hf_weights(tmp, tensors, max_shard_size=max_shard_size, progress=progress)
        copy_processor_files(source, tmp)
    return os.path.abspath(os.fspath(path))


def _save_orbax(directory: str, params: Mapping[str, Any]) -> None:
    import jax
    import orbax.checkpoint as ocp

    # One tensorstore per parameter instead of OCDBT's shared store: OCDBT gathers every array
    # into a host copy first (measured: align-base conversion peak 2.2x the checkpoint, vs 1.4x).
    # No replica-parallel writes: orbax would compile a slicing program per shape and device for
    # replicated arrays (tens of seconds for a tiny model on 8 CPU devices).
    arrays = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=arrays)
    absl = logging.getLogger("absl")
    absl.addFilter(_quiet_orbax_save)
    try:
        ocp.Checkpointer(handler).save(os.path.abspath(directory), _nest(params))
    except OSError:
        raise
    except Exception as e:
        # A write that failed (a full disk, no permission) arrives as a ValueError carrying
        # tensorstore's status: one line saying which file and why, as an OSError would.
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), directory) from None
        raise
    finally:
        absl.removeFilter(_quiet_orbax_save)


def _quiet_orbax_save(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    # Without OCDBT (on purpose, above) orbax warns at every save that it found no per-process
    # OCDBT directories to merge: nothing is wrong, and the warning names a temporary directory.
    # A failed write is logged with its traceback by each of orbax's writer threads; the save
    # then raises, and that error is reported once.
    return "Skipping merge of OCDBT checkpoints" not in message and "_SignalingThread.run() raised" not in message
