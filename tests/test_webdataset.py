"""WebDataset shards cut at any byte: every cut is reported with the shard, the samples kept and
the samples lost, and only complete samples are kept.

Python's tarfile (what altjax used to index shards with) stops silently at a truncated or
missing header, as if the archive ended there: a shard cut at a header boundary or inside a
header lost every later sample without a word. These tests cut generated shards at offsets of
every class (inside a header, at a header boundary, inside a member's data, inside the padding
after it, inside and after the end-of-archive marker) and check the report and the counts.
"""
import json
import logging
import os
import tarfile

import pytest

from altjax.data import sources, webdataset

FIELDS = ("jpg", "txt", "json")
NUM_SAMPLES = 5


def _samples(count, *, start=0):
    # Sizes that do not fill their last 512-byte block, so that every member has padding.
    return [{"__key__": f"{i:06d}", "jpg": bytes([i % 251]) * (300 + 97 * i), "txt": f"caption {i}",
             "json": {"index": i}} for i in range(start, start + count)]


def _layout(path):
    """[(key, header offset, data offset, data end, padded end)] of a tar's members, and the
    offset of its end-of-archive marker."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            end = m.offset_data + m.size
            members.append((webdataset.split_name(m.name)[0], m.offset, m.offset_data, end, -(-end // 512) * 512))
    return members, members[-1][4]


def _cut_offsets(members, eoa, size):
    """Offsets of every class: (offset, class)."""
    cuts = []
    for key, header, data, end, padded in members:
        cuts += [(header, "header boundary"), (header + 1, "inside a header"), (header + 99, "inside a header"),
                 (header + 100, "inside a header"), (header + 257, "inside a header"),
                 (header + 511, "inside a header"), (data, "inside data"), (data + 1, "inside data"),
                 (end - 1, "inside data")]
        if padded > end:
            cuts += [(end, "inside padding"), (padded - 1, "inside padding")]
    cuts += [(eoa, "header boundary"), (eoa + 1, "inside the end-of-archive marker"),
             (eoa + 511, "inside the end-of-archive marker"), (eoa + 512, "inside the end-of-archive marker"),
             (eoa + 1023, "inside the end-of-archive marker")]
    if size > eoa + 1024:
        cuts += [(eoa + 1025, "after the end-of-archive marker"), (size - 1, "after the end-of-archive marker")]
    return cuts


def _complete_samples(members, cut):
    """Samples whose members' data all lie before the cut (a sample is its consecutive members)."""
    ends = {}
    for key, _, _, end, _ in members:
        ends[key] = max(ends.get(key, 0), end)
    return sum(1 for end in ends.values() if end <= cut)


def _started(members, cut):
    """Whether a sample was started but not completed before the cut (its header is there)."""
    complete = _complete_samples(members, cut)
    keys = list(dict.fromkeys(m[0] for m in members))
    return complete < len(keys) and any(m[0] == keys[complete] and m[1] < cut for m in members)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shard") / "00000.tar")
    assert webdataset.write_shard(path, _samples(NUM_SAMPLES)) == NUM_SAMPLES
    members, eoa = _layout(path)
    return path, open(path, "rb").read(), members, eoa


@pytest.mark.parametrize("with_stats", [False, True], ids=["no stats file", "img2dataset stats file"])
def test_a_cut_at_any_offset_is_reported_with_the_samples_lost(shard, tmp_path, with_stats):
    path, data, members, eoa = shard
    cut_path = str(tmp_path / "00007.tar")
    if with_stats:  # img2dataset writes <shard>_stats.json beside each shard
        (tmp_path / "00007_stats.json").write_text(json.dumps({"count": 9, "successes": NUM_SAMPLES}))
    cuts = _cut_offsets(members, eoa, len(data))
    assert {c for _, c in cuts} == {"header boundary", "inside a header", "inside data", "inside padding",
                                   "inside the end-of-archive marker", "after the end-of-archive marker"}
    for cut, kind in cuts:
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        samples, damage = webdataset.index_shard(cut_path, fields=FIELDS)
        what = f"cut at byte {cut} ({kind})"
        if cut % 512 == 0 and cut >= eoa + 1024:
            # The end-of-archive marker is whole: a tar without padding, nothing to report.
            assert damage is None and len(samples) == NUM_SAMPLES, f"{what}: {damage}"
            continue
        assert damage is not None, f"{what}: not reported ({len(samples)} samples read)"
        expected = _complete_samples(members, cut)
        assert [key for key, _ in samples] == [f"{i:06d}" for i in range(expected)], (
            f"{what}: kept {[key for key, _ in samples]}, expected the {expected} complete samples")
        assert all(set(fields) == set(FIELDS) for _, fields in samples), f"{what}: a partial sample was kept"
        message = str(damage)
        assert message.startswith(f"{cut_path}: truncated or corrupt tar") and damage.kept == expected, message
        assert (f"kept the first {expected} sample" if expected else "kept no samples") in message, message
        if with_stats:
            assert damage.lost == NUM_SAMPLES - expected, f"{what}: lost {damage.lost}: {message}"
            assert f"lost {NUM_SAMPLES - expected} of the {NUM_SAMPLES} samples its _stats.json lists" in message, message
        elif cut >= eoa:
            # Every sample's data is there: the cut fell in (or after) the end-of-archive marker.
            assert cut == eoa or damage.lost == 0 and "lost no samples" in message, f"{what}: {message}"
        else:
            assert damage.lost is None and "lost" in message and "how many is unknown" in message, message
            if _started(members, cut):
                assert damage.lost_count >= 1, f"{what}: a sample was cut but lost {damage.lost_count}: {message}"


def test_tarfile_alone_misses_header_cuts(shard, tmp_path):
    # Why index_shard looks past tarfile: at a header boundary and inside a header tarfile ends
    # the archive there without an error (the regression the issue reports).
    path, data, members, _ = shard
    cut_path = str(tmp_path / "cut.tar")
    for cut in (members[3][1], members[3][1] + 100):
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        with tarfile.open(cut_path, "r:") as tar:
            assert len(tar.getmembers()) == 3, "tarfile's behaviour changed: it now sees the cut"
        samples, damage = webdataset.index_shard(cut_path)
        assert damage is not None and len(samples) == 1, f"cut at {cut}: {len(samples)} samples, {damage}"


def test_source_logs_the_shard_and_the_count_and_keeps_only_complete_samples(tmp_path, caplog):
    # 128 samples per shard as in the issue: shard 1 cut at the header of its sample 78 (50 of 128
    # lost), with img2dataset's stats file; shard 2 cut right after its first member (its first
    # sample is partial: the other shards' fields tell).
    paths = [str(tmp_path / f"{s:05d}.tar") for s in range(3)]
    for s, path in enumerate(paths):
        webdataset.write_shard(path, [dict(x, jpg=b"x" * 40) for x in _samples(128, start=128 * s)])
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 128, "count": 130}))
    members, _ = _layout(paths[1])
    header_78 = next(m[1] for m in members if m[0] == f"{128 + 78:06d}")
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[:header_78])
    members, _ = _layout(paths[2])
    data = open(paths[2], "rb").read()
    open(paths[2], "wb").write(data[:members[1][1]])

    with caplog.at_level(logging.WARNING, logger="altjax.data"):
        source = sources.WebDatasetSource(str(tmp_path / "*.tar"))
    assert len(source) == 128 + 78, f"{len(source)} samples read"
    assert [d.path for d in source.shard_damage] == paths[1:], source.damaged
    assert [(d.kept, d.lost) for d in source.shard_damage] == [(78, 50), (0, None)], source.damaged
    assert source.lost_samples == 51, f"lost_samples {source.lost_samples}"
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(paths[1] in m and "kept the first 78 samples, lost 50 of the 128" in m for m in logged), logged
    assert any(paths[2] in m and "kept no samples, lost 1 cut sample" in m for m in logged), logged
    assert any("2 of 3 WebDataset shards are truncated or corrupt: 206 samples kept, 51 lost and the unknown "
               "rest of 1 shards" in m for m in logged), logged
    assert all(set(source[i]) == {"__key__", *FIELDS} for i in (0, 127, 128, 205)), "a partial sample was kept"


def test_not_a_tar_and_a_corrupt_header_are_reported(shard, tmp_path):
    path, data, members, _ = shard
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    samples, damage = webdataset.index_shard(str(bad))
    assert samples == [] and damage is not None and "kept no samples" in str(damage), damage
    bad.write_bytes(b"")
    samples, damage = webdataset.index_shard(str(bad))
    assert samples == [] and damage is not None and "the file is empty" in str(damage), damage
    # A header whose checksum fails in the middle of the shard (bit rot): the samples before it stay.
    broken = bytearray(data)
    broken[members[6][1] + 10] ^= 0xFF
    bad.write_bytes(bytes(broken))
    samples, damage = webdataset.index_shard(str(bad))
    assert len(samples) == 2 and damage is not None and f"corrupt 512-byte header at byte {members[6][1]}" in str(damage), damage
