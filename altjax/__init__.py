"""altjax: contrastive image-text dual encoders (ALIGN, AltCLIP, CLIP) in JAX/Flax NNX.

The public names are imported lazily so that ``import altjax`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "AlignConfig": "altjax.models.align",
    "AlignModel": "altjax.models.align",
    "AltCLIPConfig": "altjax.models.altclip",
    "AltCLIPModel": "altjax.models.altclip",
    "CLIPConfig": "altjax.models.clip",
    "CLIPModel": "altjax.models.clip",
    "AlignProcessor": "altjax.processing",
    "AltCLIPProcessor": "altjax.processing",
    "CLIPProcessor": "altjax.processing",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("losses", "sharding", "model_io", "models", "processing", "evaluation", "data", "console"):
        return importlib.import_module(f"altjax.{name}")
    raise AttributeError(f"module 'altjax' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
