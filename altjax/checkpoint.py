"""Reading Hugging Face checkpoint directories (config.json + safetensors) without torch."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, unreadable or of the wrong kind."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF (or altjax) model directory, as a dict."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json in the model directory")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def check_model_type(config: Mapping[str, Any], expected: str, source: str) -> None:
    got = config.get("model_type")
    if got != expected:
        raise CheckpointError(f"{source}: model_type is {got!r}, expected {expected!r}")


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A lazy mapping over one ``.safetensors`` file: each tensor is read when it is looked up."""

    def __init__(self, file: str | os.PathLike):
        from safetensors import safe_open

        self.file = str(file)
        try:
            self._handle = safe_open(self.file, framework="np")
            self._keys = list(self._handle.keys())
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{self.file}: not a readable safetensors file ({e})") from None

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {key!r} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_weights(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The weights of an HF model directory as a lazy key -> array mapping."""
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no model.safetensors in the model directory")
    return SafetensorsFile(file)


def load_hf_model(
    path: str | os.PathLike,
    *,
    build: Callable[[dict[str, Any]], Any],
    table: Callable[[Any], Any],
    seed: int = 0,
) -> Any:
    """Loads an HF directory into a new NNX model without initialising random weights first.

    ``build(config_dict)`` returns ``(config, make_model)`` where ``make_model()`` constructs the
    model; ``table(config)`` returns its conversion ``Table``. The model is built abstractly
    (``nnx.eval_shape``), filled from the checkpoint, and its dropout RNG streams seeded with ``seed``.
    """
    from flax import nnx

    from altjax.conversion import engine

    config, make_model = build(read_config(path))
    model = nnx.eval_shape(make_model)
    tensors = open_weights(path)
    params = engine.torch_to_nnx(tensors, table(config), engine.model_shapes(model), source=getattr(tensors, "file", str(path)))
    engine.load_params(model, params)
    nnx.reseed(model, default=seed, dropout=seed)
    return model
