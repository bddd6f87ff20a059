"""``tf.train.Example`` protos without TensorFlow or tensorflow-datasets.

TFRecord and ArrayRecord files of image-text pairs hold one serialised Example per record, e.g.
``{"image": <jpeg bytes>, "caption": <utf-8 bytes>}``. The message classes are built here from
the definitions of TensorFlow's ``example.proto`` and ``feature.proto``, with the protobuf runtime
that orbax-checkpoint already loads in every run: the classes tensorflow-datasets ships
(``tensorflow_datasets.proto.tf_example_pb2``) cost importing tensorflow_datasets, about 300
modules and 0.4 s after jax, in every run that reads these files; a hand-written decoder would
have to reproduce protobuf's handling of merged, repeated and unknown fields, which the runtime
gets right by construction (``tests/test_data.py`` compares the two on every wire form).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _example_class():
    """``tensorflow.Example``: the messages of example.proto and feature.proto, field for field."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="altjax/tf_example.proto", package="tensorflow", syntax="proto3")

    def field(message, name, number, kind, type_name=None, label=F.LABEL_OPTIONAL, **more):
        message.field.add(name=name, number=number, type=kind, label=label,
                          type_name=f".tensorflow.{type_name}" if type_name else None, **more)

    for name, kind in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        field(proto.message_type.add(name=name), "value", 1, kind, label=F.LABEL_REPEATED)  # proto3: packed
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                                ("int64_list", "Int64List")), 1):
        field(feature, name, number, F.TYPE_MESSAGE, type_name, oneof_index=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")  # map<string, Feature> feature = 1
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_MESSAGE, "Feature")
    field(features, "feature", 1, F.TYPE_MESSAGE, "Features.FeatureEntry", label=F.LABEL_REPEATED)
    field(proto.message_type.add(name="Example"), "features", 1, F.TYPE_MESSAGE, "Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()


def _as_list(value: Any) -> list:
    if isinstance(value, (bytes, str)) or np.ndim(value) == 0:
        return [value]
    return list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)


def encode_example(features: Mapping[str, Any]) -> bytes:
    """A serialised ``tf.train.Example`` of a flat dict.

    Values are bytes or str (a ``bytes_list``; str is UTF-8 encoded), integers or bools
    (``int64_list``), floats (``float_list``), or lists/arrays of one of these kinds.
    """
    example = Example()
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
    example = Example.FromString(data)
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
