"""HF weight files: read lazily, one tensor at a time, and written as transformers writes them.

Read: ``model.safetensors``, sharded safetensors behind ``model.safetensors.index.json``, or
``pytorch_model.bin`` (torch is needed for that one only), each as a mapping key -> array whose
tensors are read from disk when looked up, so loading holds about one copy of the model.
Written: one ``model.safetensors`` up to a size limit, shards and their index above it.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Iterator, Mapping

import numpy as np

from altjax.model_io.directories import (
    ALTJAX_PARAMS_DIR,
    BIN_INDEX_NAME,
    BIN_WEIGHTS_NAME,
    SAFE_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WRITER_METADATA,
    CheckpointError,
    write_json,
)
from altjax.model_io.safetensors_io import SafetensorsError, SafetensorsReader, write_safetensors
from altjax.console import Progress

# transformers 5's default: one file up to 50 GB.
DEFAULT_MAX_SHARD_SIZE = "50GB"


class SafetensorsFile(SafetensorsReader):
    """A lazy mapping over one ``.safetensors`` file (``altjax.model_io.safetensors_io``), with its errors
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

    with Progress(sum(sizes.values()), "writing safetensors", unit="B", unit_scale=True, enabled=progress) as bar:
        for name, shard in zip(names, shards):
            write_safetensors(os.path.join(folder, name), Counted(), shard, metadata=WRITER_METADATA)
    if len(shards) > 1:
        write_json(os.path.join(folder, SAFE_INDEX_NAME), {
            "metadata": {"total_size": sum(sizes.values()),
                         "total_parameters": sum(math.prod(tensors.shape(k)) for k in keys)},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        })
        names.append(SAFE_INDEX_NAME)
    return names


# --- whole models ---------------------------------------------------------------------------------

