"""``tf.train.Example`` protos without TensorFlow, through the copies of TensorFlow's ``.proto``
definitions that tensorflow-datasets ships (``tensorflow_datasets.proto.tf_example_pb2``).

TFRecord and ArrayRecord files of image-text pairs hold one serialised Example per record, e.g.
``{"image": <jpeg bytes>, "caption": <utf-8 bytes>}``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2


def _as_list(value: Any) -> list:
    if isinstance(value, (bytes, str)) or np.ndim(value) == 0:
        return [value]
    return list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)


def encode_example(features: Mapping[str, Any]) -> bytes:
    """A serialised ``tf.train.Example`` of a flat dict.

    Values are bytes or str (a ``bytes_list``; str is UTF-8 encoded), integers or bools
    (``int64_list``), floats (``float_list``), or lists/arrays of one of these kinds.
    """
    example = tf_example_pb2.Example()
    for key, value in features.items():
        items = _as_list(value)
        feature = example.features.feature[key]
        if not items:
            raise ValueError(f"feature {key!r} is empty: its kind cannot be told")
        first = items[0]
        if isinstance(first, (bytes, str, np.bytes_, np.str_)):
            feature.bytes_list.value.extend(x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in items)
        elif isinstance(first, (bool, int, np.integer, np.bool_)):
            feature.int64_list.value.extend(int(x) for x in items)
        elif isinstance(first, (float, np.floating)):
            feature.float_list.value.extend(float(x) for x in items)
        else:
            raise TypeError(f"feature {key!r}: unsupported value type {type(first).__name__}")
    return example.SerializeToString()


def parse_example(data: bytes) -> dict[str, Any]:
    """A serialised ``tf.train.Example`` as a dict: a one-element list becomes its element (bytes,
    int or float), longer lists become a list of bytes or an int64/float32 array."""
    example = tf_example_pb2.Example.FromString(data)
    out: dict[str, Any] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            values: Any = list(feature.bytes_list.value)
        elif kind == "int64_list":
            values = np.asarray(feature.int64_list.value, np.int64)
        elif kind == "float_list":
            values = np.asarray(feature.float_list.value, np.float32)
        else:
            values = []
        out[key] = values[0].item() if isinstance(values, np.ndarray) and values.size == 1 else (
            values[0] if isinstance(values, list) and len(values) == 1 else values)
    return out
