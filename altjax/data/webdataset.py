"""WebDataset tar shards (as img2dataset writes them): writing, indexing and random-access reading.

A shard is a plain tar file whose members are grouped into samples by key: ``000123.jpg``,
``000123.txt`` and ``000123.json`` are the fields ``jpg``, ``txt`` and ``json`` of sample
``000123``. As in the webdataset library, the key is the member path up to the first dot of its
file name, and a sample's members are consecutive in the tar.
"""
from __future__ import annotations

import dataclasses
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


BLOCK = 512  # tar headers and data are laid out in 512-byte blocks
END_OF_ARCHIVE = 2 * BLOCK  # a tar ends with two zero blocks


@dataclasses.dataclass(frozen=True)
class ShardDamage:
    """A shard that is truncated or corrupt: ``kept`` complete samples could be read before the
    damage at byte ``offset`` (``where`` says what was cut there), and the samples after it are
    lost. ``lost`` is how many, when known: the number the shard should hold comes from
    img2dataset's ``<shard>_stats.json`` (``successes``) next to it; without one, ``lost`` is None
    and ``lost_at_least`` counts the samples known to be cut (a sample whose members were cut off,
    or whose header was started), the rest of the shard being unknown."""

    path: str
    offset: int
    where: str
    kept: int
    lost_at_least: int
    lost: int | None = None
    expected: int | None = None

    @property
    def lost_count(self) -> int:
        """The samples lost: exact when known, else the lower bound."""
        return self.lost if self.lost is not None else self.lost_at_least

    def __str__(self) -> str:
        unknown = "how many is unknown: no _stats.json next to the shard gives its sample count"
        if self.expected is not None:
            lost = f"lost {self.lost} of the {self.expected} samples its _stats.json lists"
        elif self.lost == 0:
            lost = "lost no samples"
        elif self.lost_at_least:
            lost = f"lost 1 cut sample and every sample after it ({unknown})"
        else:
            lost = f"lost every sample after {'them' if self.kept else 'the start'} ({unknown})"
        kept = f"kept the first {self.kept} sample{'' if self.kept == 1 else 's'}" if self.kept else "kept no samples"
        return f"{self.path}: truncated or corrupt tar, {self.where}; {kept}, {lost}"


def _expected_samples(path: str) -> int | None:
    """The sample count img2dataset recorded for a shard (``00012.tar`` -> ``00012_stats.json``)."""
    stats = os.path.join(os.path.dirname(path), split_name(os.path.basename(path))[0] + "_stats.json")
    try:
        with open(stats, encoding="utf-8") as f:
            value = json.load(f).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _header_name(block: bytes) -> str | None:
    """The member name of a (possibly partial) ustar header, when its 100-byte name field is
    there (ustar's 155-byte prefix is ignored: the key is what matters, and it rarely needs one)."""
    name, nul, _ = block[:100].partition(b"\0")
    if not nul and len(block) < 100:
        return None
    return name.decode("utf-8", "replace") or None


def index_shard(path: str | os.PathLike, *, fields: Iterable[str] | None = None,
                ) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], ShardDamage | None]:
    """The samples of a shard: (key, {extension: (data offset, size)}) in order, from the tar
    headers alone. Returns the index and None, or the complete samples before the damage and a
    :class:`ShardDamage` when the tar is truncated or corrupt (the samples after it cannot be found).

    Every cut that can be told from a complete tar is found: inside a member's data or the padding
    after it, inside a 512-byte header, exactly at a header boundary (the end-of-archive marker is
    missing), inside the marker, or inside the padding after it (a size that is not a multiple of
    512; nothing is lost there). Python's tarfile reads most of these without complaint, as if
    the archive ended at the cut. A sample whose members were cut off is dropped and counted as
    lost: the last sample before a cut is kept only when the cut is known to fall after it (a
    header of the next sample, the end-of-archive marker) or it has the fields of the sample
    before it (of ``fields``, say another shard's, when it is the first).
    """
    path = os.fspath(path)
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    size = os.path.getsize(path)
    where = None
    cut_key = None  # the key of the member known to be cut ("" when its header's name is cut too)
    last_member = None
    stop = 0  # where reading stopped: the header after the last member read
    tar = None
    try:
        tar = tarfile.open(path, "r:")
        for member in tar:
            last_member = member.name
            if not member.isfile():
                continue
            key, extension = split_name(member.name)
            if member.offset_data + member.size > size:
                where = (f"cut at byte {size} inside the data of {member.name} "
                         f"({size - member.offset_data} of its {member.size} bytes)")
                cut_key = key
                break
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][extension] = (member.offset_data, member.size)
        stop = tar.offset
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        # tarfile raises on a damaged first header and on a cut in the padding after a member's
        # data; anything else it raises for is reported as it says.
        stop = tar.offset if tar is not None else 0
        if size == 0:
            where = "the file is empty"
        elif stop < size and (size - stop >= BLOCK or samples):
            where = f"unreadable at byte {stop} ({e})"
    finally:
        if tar is not None:
            tar.close()
    complete = False  # the cut is known to fall after the last sample read
    if where is None:
        with open(path, "rb") as f:
            f.seek(stop)
            tail = f.read(END_OF_ARCHIVE)
        after = f"after {last_member}" if last_member else "at the start"
        if len(tail) >= BLOCK and not tail[:BLOCK].strip(b"\0") and size - stop >= END_OF_ARCHIVE:
            if size % BLOCK == 0:
                return samples, None  # the end-of-archive marker: the tar is complete
            where = f"cut at byte {size} inside the padding after the end-of-archive marker"
            complete = True
        elif tail and not tail.strip(b"\0"):
            where = f"cut at byte {size} inside the end-of-archive marker at byte {stop}"
            complete = True
        elif stop > size:
            where = f"cut at byte {size} inside the padding {after} (the end-of-archive marker is missing)"
        elif stop == size:
            where = f"cut at byte {size} right {after}, at a header boundary (the end-of-archive marker is missing)"
        elif len(tail) < BLOCK:
            where = f"cut at byte {size} inside the 512-byte header at byte {stop}"
            name = _header_name(tail)
            cut_key = split_name(name)[0] if name else ""
        else:
            where = f"corrupt 512-byte header at byte {stop}"
    lost_at_least = 0
    if cut_key:  # the member cut (its data or its header) is known by name
        lost_at_least, complete = 1, True
        if samples and samples[-1][0] == cut_key:
            samples.pop()  # its remaining members are gone
    elif cut_key == "":  # a header was started, its name cut: some sample was cut
        lost_at_least = 1
    reference = set(samples[-2][1]) if len(samples) >= 2 else set(fields or ())
    if not complete and samples and set(samples[-1][1]) < reference:
        # Nothing says whether the last sample was complete: it is kept when it has the fields of
        # the sample before it.
        samples.pop()
        lost_at_least = 1
    expected = _expected_samples(path)
    if expected is not None:
        lost = max(expected - len(samples), lost_at_least)
    else:
        lost = 0 if complete and not lost_at_least else None
    return samples, ShardDamage(path, stop, where, len(samples), lost_at_least, lost, expected)
