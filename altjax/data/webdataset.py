"""WebDataset tar shards (as img2dataset writes them): writing, indexing and random-access reading.

A shard is a plain tar file whose members are grouped into samples by key: ``000123.jpg``,
``000123.txt`` and ``000123.json`` are the fields ``jpg``, ``txt`` and ``json`` of sample
``000123``. As in the webdataset library, the key is the member path up to the first dot of its
file name, and a sample's members are consecutive in the tar.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any, Iterable, Mapping

TEXT_EXTENSIONS = ("txt", "text", "caption")


def split_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``: the key ends at the file name's first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot:
        return name, ""
    return (f"{directory}/{stem}" if directory else stem), extension


def encode_field(extension: str, value: Any) -> bytes:
    """A field's bytes: str is UTF-8, a dict or list under ``json`` is JSON, bytes stay as they are."""
    if isinstance(value, bytes):
        return value
    if extension == "json" and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int):  # a class index ("cls")
        return str(value).encode("utf-8")
    raise TypeError(f"field {extension!r}: cannot write a {type(value).__name__}")


def decode_field(extension: str, data: bytes) -> Any:
    """A field's value: text extensions give str, ``json`` a parsed object, ``cls`` an int, and
    anything else (images) the raw bytes. Raises ValueError on undecodable text or JSON."""
    if extension in TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if extension == "json":
        return json.loads(data.decode("utf-8"))
    if extension == "cls":
        return int(data.decode("utf-8").strip())
    return data


def write_shard(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> int:
    """Writes samples (``{"__key__": "000123", "jpg": b"...", "txt": "a cat", ...}``) to a tar
    shard, atomically (a temporary file renamed when complete). Returns the number of samples."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for extension, value in sample.items():
                if extension == "__key__":
                    continue
                data = encode_field(extension, value)
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(tmp, path)
    return count


def index_shard(path: str | os.PathLike) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], str | None]:
    """The samples of a shard: (key, {extension: (data offset, size)}) in order, from the tar
    headers alone. Returns the index and None, or the samples before the damage and a description
    of it when the tar is truncated or corrupt (the samples after it cannot be found)."""
    path = os.fspath(path)
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    size = os.path.getsize(path)
    damage = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    damage = f"{path}: member {member.name} is truncated"
                    break
                key, extension = split_name(member.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][extension] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        damage = f"{path}: unreadable tar after {len(samples)} samples ({e})"
    return samples, damage
