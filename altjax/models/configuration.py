"""Reading and writing Hugging Face ``config.json`` dictionaries for altjax's config dataclasses.

Every model config in altjax is a frozen dataclass whose field names are the HF config keys, plus an
``extra`` dict that keeps every key altjax does not model (``architectures``, ``transformers_version``,
``dtype``, ...). Reading a config and writing it back therefore gives the same dictionary.

A few fields are altjax's own (``altjax_field``: how parameters are laid out, not what the model
computes). The HF dictionary leaves them out; an altjax directory records them beside it
(``PretrainedModel.save_pretrained``), and reading either dictionary accepts them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from altjax.model_io.pretrained import ALTJAX_ONLY

T = TypeVar("T")


def altjax_field(default: Any) -> Any:
    """A dataclass field of altjax's own, with ``default``: not written to HF config dicts."""
    return dataclasses.field(default=default, metadata={ALTJAX_ONLY: True})


def _to_python(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_python(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_hf(value)
    return value


def _field_value(field: dataclasses.Field, value: Any) -> Any:
    # JSON has only lists; the dataclasses hold tuples so that they stay hashable and immutable.
    if isinstance(value, list) and "tuple" in str(field.type):
        return tuple(value)
    return value


def config_from_hf(cls: type[T], d: dict[str, Any], **overrides: Any) -> T:
    """Builds ``cls`` from an HF config dict; unknown keys go to ``extra``, missing keys take defaults."""
    names = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs = {k: _field_value(names[k], v) for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    kwargs.update(overrides)
    return cls(**kwargs, extra=extra)


def config_to_hf(cfg: Any) -> dict[str, Any]:
    """The HF config dict for ``cfg``: its fields (tuples as lists, altjax's own left out) followed by
    the kept extra keys."""
    d = {f.name: _to_python(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
         if f.name != "extra" and not f.metadata.get(ALTJAX_ONLY)}
    d.update(cfg.extra)
    return d

