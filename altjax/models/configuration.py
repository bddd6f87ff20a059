"""Reading and writing Hugging Face ``config.json`` dictionaries for altjax's config dataclasses.

Every model config in altjax is a frozen dataclass whose field names are the HF config keys, plus an
``extra`` dict that keeps every key altjax does not model (``architectures``, ``transformers_version``,
``dtype``, ...). Reading a config and writing it back therefore gives the same dictionary.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


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
    """The HF config dict for ``cfg``: its fields (tuples as lists) followed by the kept extra keys."""
    d = {f.name: _to_python(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "extra"}
    d.update(cfg.extra)
    return d

