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


def dual_encoder_config_from_hf(cls: type[T], d: dict[str, Any], *, model_type: str, text_cls: type,
                                vision_cls: type, what: str) -> T:
    """A CLIP-style dual encoder config (``text_config`` + ``vision_config``) from an HF dict.

    ``what`` names the model in the error for another ``model_type`` ("a CLIP"). Legacy ``text_config_dict`` / ``vision_config_dict`` are merged as transformers does: every
    tower field then comes from the legacy dict (or its default), other keys of ``text_config`` /
    ``vision_config`` are kept.
    """
    got = d.get("model_type")
    if got != model_type:
        raise ValueError(f"not {what} config: model_type is {got!r}, expected {model_type!r}")
    d = dict(d)
    text = dict(d.get("text_config") or {})
    vision = dict(d.get("vision_config") or {})
    if (legacy := d.pop("text_config_dict", None)) is not None:
        text.update(config_to_hf(text_cls.from_hf(legacy)))
    if (legacy := d.pop("vision_config_dict", None)) is not None:
        vision.update(config_to_hf(vision_cls.from_hf(legacy)))
    return config_from_hf(cls, d, text_config=text_cls.from_hf(text), vision_config=vision_cls.from_hf(vision))
