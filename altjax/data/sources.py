"""Random-access sources of image-text records: tfds datasets, WebDataset tars, TFRecord and
ArrayRecord files. None of them needs TensorFlow.

A source is a sequence: ``len(source)`` records, ``source[i]`` the raw fields of record ``i`` as a
dict (image bytes, caption text, other fields), ``source.describe(i)`` where it lives (for
warnings). Reading may raise on a damaged record; the pipeline skips and counts such records.
Damage found while indexing files (a truncated tar or TFRecord file) is logged and listed in
``source.damaged``: the records before it are kept. Each source has default ``image_key`` and
``caption_key`` that the pipeline uses unless told otherwise; nested fields are named with
``/`` (``"captions/text"`` for tfds ``coco_captions``).
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from typing import Any, Iterable, Sequence

from altjax.data import tfrecord, webdataset
from altjax.data.example import parse_example

log = logging.getLogger("altjax.data")


def expand_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A glob pattern, a path, or a list of them -> the sorted matching files (FileNotFoundError if none)."""
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"no file matches {pattern!r}")
        out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no files given: {files!r}")
    return out


def get_field(record: dict[str, Any], key: str) -> Any:
    """``record[key]``, where ``"a/b"`` reads ``record["a"]["b"]`` unless ``"a/b"`` is itself a key
    (flat TFRecord features are often named like ``image/encoded``)."""
    if key in record:
        return record[key]
    value: Any = record
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"record has no field {key!r} (fields: {sorted(record)})")
        value = value[part]
    return value


class _Files:
    """Lazily opened read-only descriptors, shared by threads (reads use pread, which has no
    file position to race on)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def fd(self, i: int) -> int:
        with self._lock:
            if i not in self._fds:
                self._fds[i] = os.open(self.paths[i], os.O_RDONLY)
            return self._fds[i]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _note_damage(damaged: list[str], message: str | None) -> None:
    if message:
        damaged.append(message)
        log.warning("damaged input, records after this point are lost: %s", message)


class WebDatasetSource:
    """Samples of WebDataset tar shards (``{key}.jpg`` + ``{key}.txt`` / ``{key}.json``, as
    img2dataset writes). Fields are named by extension: ``txt`` is str, ``json`` a parsed object
    (img2dataset's caption is also at ``json/caption``), images are bytes.

    A truncated or corrupt shard (cut at any byte) is logged as a warning naming the shard, the
    samples kept and the samples lost (see :func:`altjax.data.webdataset.index_shard`), and listed
    in ``damaged`` (the messages) and ``shard_damage`` (:class:`~altjax.data.webdataset.ShardDamage`);
    ``lost_samples`` counts the samples lost (exact where img2dataset's ``_stats.json`` gives a
    shard's size, otherwise those known to be cut)."""

    def __init__(self, files, *, image_key: str = "jpg", caption_key: str = "txt"):
        self.image_key, self.caption_key = image_key, caption_key
        self.files = _Files(expand_files(files))
        self.damaged: list[str] = []
        self.shard_damage: list[webdataset.ShardDamage] = []
        self._samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for i, path in enumerate(self.files.paths):
            reference = self._samples[-1][2] if self._samples else None
            samples, damage = webdataset.index_shard(path, fields=reference)
            self._samples.extend((i, key, fields) for key, fields in samples)
            if damage is not None:
                self.shard_damage.append(damage)
                self.damaged.append(str(damage))
                log.warning("damaged input: %s", damage)
        if len(self.shard_damage) > 1:
            unknown = sum(d.lost is None for d in self.shard_damage)
            log.warning("%d of %d WebDataset shards are truncated or corrupt: %d samples kept, %d lost%s",
                        len(self.shard_damage), len(self.files.paths), len(self._samples), self.lost_samples,
                        f" and the unknown rest of {unknown} shards" if unknown else "")

    @property
    def lost_samples(self) -> int:
        """Samples lost to damaged shards: exact for shards whose ``_stats.json`` gives their
        size, for the others the samples known to be cut (the rest of such a shard is unknown)."""
        return sum(d.lost_count for d in self.shard_damage)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, key, fields = self._samples[index]
        fd = self.files.fd(shard)
        record: dict[str, Any] = {"__key__": key}
        for extension, (offset, size) in fields.items():
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise tfrecord.CorruptRecordError(f"{self.describe(index)}.{extension} is truncated")
            record[extension] = webdataset.decode_field(extension, data)
        return record

    def describe(self, index: int) -> str:
        shard, key, _ = self._samples[index]
        return f"{self.files.paths[shard]}:{key}"

    def close(self) -> None:
        self.files.close()


class TFRecordSource:
    """Records of TFRecord files of serialised ``tf.train.Example`` protos (checksums verified)."""

    def __init__(self, files, *, image_key: str = "image", caption_key: str = "caption"):
        self.image_key, self.caption_key = image_key, caption_key
        self.files = _Files(expand_files(files))
        self.damaged: list[str] = []
        self._records: list[tuple[int, int, int]] = []
        for i, path in enumerate(self.files.paths):
            index, damage = tfrecord.index_tfrecord(path)
            self._records.extend((i, offset, length) for offset, length in index)
            _note_damage(self.damaged, damage)

    def __len__(self) -> int:
        return len(self._records)

    def raw(self, index: int) -> bytes:
        """The serialised record."""
        shard, offset, length = self._records[index]
        return tfrecord.read_record(self.files.fd(shard), offset, length, self.files.paths[shard])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return parse_example(self.raw(index))

    def describe(self, index: int) -> str:
        shard, offset, _ = self._records[index]
        return f"{self.files.paths[shard]}@{offset}"

    def close(self) -> None:
        self.files.close()


def write_array_record(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes records to an ArrayRecord file (one record per chunk, for fast random access),
    atomically. Returns the number written."""
    from array_record.python import array_record_module

    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count


class ArrayRecordSource:
    """Records of ArrayRecord files of serialised ``tf.train.Example`` protos."""

    def __init__(self, files, *, image_key: str = "image", caption_key: str = "caption"):
        from array_record.python import array_record_data_source

        self.image_key, self.caption_key = image_key, caption_key
        self.paths = expand_files(files)
        self.damaged: list[str] = []
        # Thread-safe: the data source shares one thread-safe reader per file.
        self._data = array_record_data_source.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return parse_example(self._data[index])

    def describe(self, index: int) -> str:
        return f"{self.paths}[{index}]"

    def close(self) -> None:
        self._data.__exit__(None, None, None)


def _skip_decoding(key: str):
    import tensorflow_datasets as tfds

    decoders: Any = tfds.decode.SkipDecoding()
    for part in reversed(key.split("/")):
        decoders = {part: decoders}
    return decoders


class TfdsSource:
    """A split of a prepared tensorflow-datasets dataset, read without TensorFlow.

    ``dataset`` is a registered name (``"coco_captions"``; ``"altjax_scenes/64px"`` once
    :mod:`altjax.data.scenes` has defined its builder, see there), a builder,
    or a prepared dataset directory (``.../coco_captions/2017/1.1.0``). ArrayRecord datasets are
    read with tfds' data source; TFRecord datasets (what ``tfds build`` writes by default) with
    :mod:`altjax.data.tfrecord` and tfds' NumPy example parser. The image feature is left encoded
    (the pipeline decodes it, and counts the ones that fail).
    """

    def __init__(self, dataset, split: str, *, data_dir: str | None = None, image_key: str = "image",
                 caption_key: str = "caption"):
        import tensorflow_datasets as tfds

        self.image_key, self.caption_key = image_key, caption_key
        if isinstance(dataset, tfds.core.DatasetBuilder):
            builder = dataset
        elif os.path.isfile(os.path.join(os.fspath(dataset), "dataset_info.json")):
            builder = tfds.builder_from_directory(os.fspath(dataset))
        else:
            builder = tfds.builder(dataset, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds dataset {builder.name} is not prepared in {builder.data_dir}: prepare it first "
                "(for most datasets `tfds build NAME`, which needs TensorFlow) or pass data_dir")
        self.builder, self.split = builder, split
        self.damaged: list[str] = []
        decoders = _skip_decoding(image_key)
        info = builder.info
        if info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            self._data = builder.as_data_source(split, decoders=decoders)
            self._records = None
        else:
            self._features, self._decoders = info.features, decoders
            self._records = []
            instructions = info.splits[split].file_instructions
            self.files = _Files([os.fspath(fi.filename) for fi in instructions])
            for i, instruction in enumerate(instructions):
                index, damage = tfrecord.index_tfrecord(instruction.filename)
                take = len(index) if instruction.take in (None, -1) else instruction.take
                self._records.extend((i, o, n) for o, n in index[instruction.skip:instruction.skip + take])
                _note_damage(self.damaged, damage)

    def __len__(self) -> int:
        return len(self._data) if self._records is None else len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._records is None:
            return self._data[index]
        shard, offset, length = self._records[index]
        data = tfrecord.read_record(self.files.fd(shard), offset, length, self.files.paths[shard])
        return self._features.deserialize_example_np(data, decoders=self._decoders)

    def describe(self, index: int) -> str:
        return f"{self.builder.name}/{self.split}[{index}]"

    def close(self) -> None:
        if self._records is not None:
            self.files.close()
