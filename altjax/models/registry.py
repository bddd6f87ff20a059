"""The model registry: every dual encoder altjax stores, by the ``model_type`` of its config.json.

An entry (``ModelKind``) names all a tool needs to handle a model directory: the altjax model class
(which carries its config class and its table of transformers' state dict), the processor class,
and the transformers class that is its parity reference. The command-line tools, the parity check,
the benchmarks and the training tasks look models up here; nothing else switches on model kinds.
A new model is its file under ``altjax/models/`` and one entry in ``MODELS``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from altjax.model_io.directories import check_model_type, read_config
from altjax.model_io.engine import Table
from altjax.model_io.pretrained import PretrainedModel
from altjax.models.align import AlignModel
from altjax.models.altclip import AltCLIPModel
from altjax.models.clip import CLIPModel
from altjax.processing import AlignProcessor, AltCLIPProcessor, CLIPProcessor


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One kind of model: ``model(config, dtype=..., rngs=...)``, ``model.from_pretrained(dir)``,
    ``processor.from_pretrained(dir)``, and ``transformers.<transformers_class>``, the PyTorch
    model it is a port of."""

    model: type[PretrainedModel]
    processor: type
    transformers_class: str

    @property
    def model_type(self) -> str:
        return self.model.model_type

    @property
    def config(self) -> type:
        """The config class: ``from_hf`` / ``to_hf`` / ``from_preset``."""
        return self.model.config_class

    def table(self, config: Any) -> Table:
        """The mapping between the model's parameters and transformers' state dict for ``config``."""
        return self.model.conversion_table(config)


MODELS: dict[str, ModelKind] = {
    kind.model_type: kind
    for kind in (
        ModelKind(AlignModel, AlignProcessor, "AlignModel"),
        ModelKind(AltCLIPModel, AltCLIPProcessor, "AltCLIPModel"),
        ModelKind(CLIPModel, CLIPProcessor, "CLIPModel"),
    )
}


def _known() -> str:
    return ", ".join(repr(model_type) for model_type in MODELS)


def get(model_type: str) -> ModelKind:
    """The kind registered under ``model_type``; ``ValueError`` naming the known ones otherwise."""
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; known: {_known()}") from None


def of_directory(path: str | os.PathLike) -> ModelKind:
    """The kind of the model directory at ``path`` (HF or altjax), by its config.json's
    ``model_type``; ``CheckpointError`` when there is none or it names no registered model."""
    config = read_config(path)
    check_model_type(config, tuple(MODELS), os.fspath(path))
    return MODELS[config["model_type"]]
