"""The sources a training config's ``data`` part names (:mod:`altjax.data.sources`, the scenes dataset).

``config.data.source``: ``"scenes"`` (the embedded dataset, :mod:`altjax.data.scenes`), ``"tfds"``
(``name``), ``"webdataset"``, ``"tfrecord"`` or ``"array_record"`` (``files``), each record read
through ``image_key`` and a caption field.
"""
from __future__ import annotations

from typing import Any, Optional

from altjax.data import scenes, sources


def source_from_config(data, split: str, caption_key: str, lang: Optional[str]):
    """The source of ``config.data`` (``data``) for ``split``, its captions under ``caption_key``;
    the scenes dataset gives its captions in ``lang``."""
    kind = data.source
    if kind == "scenes":
        return scenes.source(split, data_dir=data.data_dir or None, lang=lang,
                             config=scenes.scenes_config(**data.scenes))
    keys = dict(image_key=data.image_key, caption_key=caption_key)
    if kind == "tfds":
        return sources.TfdsSource(data.name, split, data_dir=data.data_dir or None, **keys)
    if kind == "webdataset":
        return sources.WebDatasetSource(data.files, **keys)
    if kind == "tfrecord":
        return sources.TFRecordSource(data.files, **keys)
    if kind == "array_record":
        return sources.ArrayRecordSource(data.files, **keys)
    raise ValueError(f"unknown data.source {kind!r}: scenes, tfds, webdataset, tfrecord or array_record")


def multilingual_source(data) -> tuple[Any, tuple[str, ...]]:
    """``(source, caption fields)`` of a ``config.data`` with captions in several languages: the
    scenes dataset with the captions of ``data.langs``, or any other source with one caption field
    per language in ``data.caption_keys``."""
    if data.source == "scenes":
        source = scenes.source(data.split, data_dir=data.data_dir or None, config=scenes.scenes_config(**data.scenes))
        return source, tuple(f"caption_{lang}" for lang in data.langs)
    keys = tuple(data.caption_keys)
    if not keys:
        raise ValueError(f"data.source {data.source!r}: set data.caption_keys to the caption field of each "
                         "language, e.g. ('en.txt', 'zh.txt') for a WebDataset")
    return source_from_config(data, data.split, keys[0], None), keys
