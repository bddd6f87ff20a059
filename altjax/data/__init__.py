"""Data: the embedded ``altjax_scenes`` dataset and input pipelines for image-text training.

* :mod:`altjax.data.scenes`: the synthetic bilingual dataset (a tfds builder) and ``load_split``.
* :mod:`altjax.data.sources`: tfds datasets, WebDataset tars, TFRecord and ArrayRecord files.
* :mod:`altjax.data.preprocess`: image decoding and transforms, captions, tokenisation.
* :mod:`altjax.data.pipeline`: :class:`InputPipeline`, the deterministic, resumable batch iterator.

Names are imported lazily: tensorflow-datasets is loaded only by what needs it.
"""
import importlib

_LAZY = {
    "InputPipeline": "altjax.data.pipeline",
    "ImageTransform": "altjax.data.preprocess",
    "TextField": "altjax.data.preprocess",
    "align_image_config": "altjax.data.preprocess",
    "clip_image_config": "altjax.data.preprocess",
    "TfdsSource": "altjax.data.sources",
    "WebDatasetSource": "altjax.data.sources",
    "TFRecordSource": "altjax.data.sources",
    "ArrayRecordSource": "altjax.data.sources",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("scenes", "sources", "preprocess", "pipeline", "tfrecord", "webdataset", "example"):
        return importlib.import_module(f"altjax.data.{name}")
    raise AttributeError(f"module 'altjax.data' has no attribute {name!r}")


__all__ = list(_LAZY)
