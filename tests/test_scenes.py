"""The embedded ``altjax_scenes`` dataset: what the captions say is what the pixels show, English
and Chinese captions say the same, held-out pairs stay out of training, generation is
deterministic, and ``load_split`` serves the evaluation."""
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from altjax.data import scenes

EN_COLOURS = [c[0] for c in scenes.COLOURS]
ZH_COLOURS = [c[1] for c in scenes.COLOURS]
EN_SHAPES = [s[0] for s in scenes.SHAPES]
ZH_SHAPES = [s[1] for s in scenes.SHAPES]
EN_SIZE = {"small": 0, "little": 0, "large": 1, "big": 1}
ZH_SIZE = {"小": 0, "大": 1}
EN_OBJECT = re.compile(rf"\b({'|'.join(EN_SIZE)}) ({'|'.join(EN_COLOURS)}) ({'|'.join(EN_SHAPES)})\b")
ZH_OBJECT = re.compile(rf"(?:(小|大)的({'|'.join(ZH_COLOURS)})|({'|'.join(ZH_COLOURS)})的(小|大))({'|'.join(ZH_SHAPES)})")
EN_POSITION = {"left": 0, "right": 1, "top": 2, "bottom": 3, "middle": 4, "centre": 4}
ZH_POSITION = {"左": 0, "右": 1, "上方": 2, "顶部": 2, "下方": 3, "底部": 3, "中": 4}
EN_RELATION = {"left": 0, "right": 1, "above": 2, "over": 2, "below": 3, "under": 3}
ZH_RELATION = {"左边": 0, "右边": 1, "上方": 2, "下方": 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small 64 px dataset, read back through tfds (images decoded from the stored JPEG)."""
    import tensorflow_datasets as tfds

    config = scenes.scenes_config(image_size=64, num_train=300, num_validation=60, num_test=240, seed=11)
    data_dir = str(tmp_path_factory.mktemp("scenes"))
    builder = scenes.prepare(config, data_dir=data_dir)
    out = {}
    for split in scenes.SPLITS:
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        out[split] = [dict(r, image=np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")),
                           caption_en=r["caption_en"].decode(), caption_zh=r["caption_zh"].decode())
                      for r in source.__getitems__(list(range(len(source))))]
        out[split].sort(key=lambda r: r["index"])
    return builder, data_dir, out


def _objects(record):
    n = int(record["num_objects"])
    return [(int(record["sizes"][i]), int(record["colours"][i]), int(record["shapes"][i])) for i in range(n)]


def _measure(image: np.ndarray, x: float, y: float):
    """Reads the object around (x, y) from the pixels alone. Its pixels are the saturated ones (the
    background is grey), the threshold halfway between the object's and the background's
    saturation, so an edge pixel counts when the object covers about half of it. Colour: the
    palette entry nearest the median pixel. Size: the area. Shape: the ideal circle, square,
    diamond or apex-up triangle of the same area and bounding-box centre that overlaps the pixels
    best (intersection over union). Returns (size, colour, shape) and the bounding-box centre."""
    size = image.shape[0]
    half = int(0.2 * size) + 1
    top, left = max(0, int(y * size) - half), max(0, int(x * size) - half)
    window = image[top:int(y * size) + half, left:int(x * size) + half].astype(np.int32)
    saturation = window.max(-1) - window.min(-1)
    mask = saturation > (np.median(saturation[saturation > 60]) + np.median(saturation[saturation < 40])) / 2
    rows, cols = np.nonzero(mask)
    area = mask.sum()
    palette = np.asarray([c[2] for c in scenes.COLOURS], np.float64)
    colour = int(np.argmin(((palette - np.median(window[mask], axis=0)) ** 2).sum(-1)))
    cy, cx = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    dx = (np.arange(window.shape[1]) + 0.5 - cx)[None, :]
    dy = (np.arange(window.shape[0]) + 0.5 - cy)[:, None]
    base = np.sqrt(area / (2 * 2.2 / 2.4))  # half base of a triangle 2.2 high per 2.4 wide
    height = 2 * base * 2.2 / 2.4
    apex = (dy + height / 2) / height
    templates = {
        "circle": dx ** 2 + dy ** 2 <= area / np.pi,
        "square": np.maximum(np.abs(dx), np.abs(dy)) <= np.sqrt(area) / 2,
        "diamond": np.abs(dx) + np.abs(dy) <= np.sqrt(area / 2),
        "triangle": (apex >= 0) & (apex <= 1) & (np.abs(dx) <= base * apex),
    }
    overlap = {name: (mask & t).sum() / (mask | t).sum() for name, t in templates.items()}
    shape = EN_SHAPES.index(max(overlap, key=overlap.get))
    # Areas: small objects 55-120 px, large 170-320 px at 64 px.
    measured_size = int(area * (64 / size) ** 2 > 145)
    return (measured_size, colour, shape), ((cx + left) / size, (cy + top) / size)


def test_pixels_show_what_the_attributes_say(dataset):
    """Colour, size, shape, position and relation read from the stored (JPEG) images agree with
    the recorded attributes, which the captions state (next test)."""
    _, _, splits = dataset
    mismatches, checked = [], 0
    for split, records in splits.items():
        for k, record in enumerate(records):
            measured = [_measure(record["image"], *record["centres"][i]) for i in range(int(record["num_objects"]))]
            for i, (attributes, centre) in enumerate(measured):
                checked += 1
                if attributes != _objects(record)[i]:
                    mismatches.append(f"{split}[{k}] object {i}: pixels {attributes}, attributes {_objects(record)[i]}")
                offset = np.abs(np.subtract(centre, record["centres"][i])).max() * 64
                if offset > 1.5:
                    mismatches.append(f"{split}[{k}] object {i}: box centre {offset:.1f} px from the recorded centre")
            if record["num_objects"] == 2:
                (ax, ay), (bx, by) = measured[0][1], measured[1][1]
                relation = int(record["relation"]) - 1
                dx, dy = bx - ax, by - ay  # subject -> other, in image fractions
                holds = [dx > 0.3 and abs(dy) < 0.2, dx < -0.3 and abs(dy) < 0.2,
                         dy > 0.3 and abs(dx) < 0.2, dy < -0.3 and abs(dx) < 0.2][relation]
                if not holds:
                    mismatches.append(f"{split}[{k}]: relation {scenes.RELATIONS[relation][0]} but dx {dx:.2f} dy {dy:.2f}")
            else:
                (x0, x1), (y0, y1) = scenes._POSITION_BOXES[int(record["position"]) - 1]
                x, y = measured[0][1]
                if not (x0 - 0.03 <= x <= x1 + 0.03 and y0 - 0.03 <= y <= y1 + 0.03):
                    mismatches.append(f"{split}[{k}]: position {int(record['position'])} but centre ({x:.2f}, {y:.2f})")
    assert not mismatches, f"{len(mismatches)} of {checked} objects disagree: {mismatches[:10]}"


def _parse_en(caption):
    objects = [(EN_SIZE[s], EN_COLOURS.index(c), EN_SHAPES.index(h)) for s, c, h in EN_OBJECT.findall(caption)]
    if " with a " in caption:  # "a B with a A to its left": A, the subject, comes second
        objects = objects[::-1]
    words = re.findall(r"[a-z]+", caption.split(":")[-1] if ":" in caption else caption)
    if len(objects) == 2:
        where = next(EN_RELATION[w] for w in words if w in EN_RELATION)
    else:
        where = next(EN_POSITION[w] for w in words if w in EN_POSITION)
    return objects, where


def _parse_zh(caption):
    objects = [(ZH_SIZE[s1 or s2], ZH_COLOURS.index(c1 or c2), ZH_SHAPES.index(h))
               for s1, c1, c2, s2, h in ZH_OBJECT.findall(caption)]
    if re.search(r"的(左边|右边|上方|下方)有一个", caption):  # "B的左边有一个A": the subject comes second
        objects = objects[::-1]
    if len(objects) == 2:
        where = next(v for k, v in ZH_RELATION.items() if f"的{k}" in caption)
    else:
        where = next(v for k, v in ZH_POSITION.items() if k in caption)
    return objects, where


def test_english_and_chinese_captions_state_the_attributes(dataset):
    """Both captions name every object with its size, colour and shape, the subject first, and
    the same position or relation; ``label`` is the subject's colour-shape class."""
    _, _, splits = dataset
    templates_en, templates_zh = set(), set()
    for split, records in splits.items():
        for k, record in enumerate(records):
            objects = _objects(record)
            where = int(record["relation"] if record["num_objects"] == 2 else record["position"]) - 1
            en, zh = _parse_en(record["caption_en"]), _parse_zh(record["caption_zh"])
            assert en == (objects, where), f"{split}[{k}] {record['caption_en']!r} reads {en}, attributes {objects, where}"
            assert zh == (objects, where), f"{split}[{k}] {record['caption_zh']!r} reads {zh}, attributes {objects, where}"
            assert record["label"] == objects[0][1] * len(scenes.SHAPES) + objects[0][2], f"{split}[{k}] label"
            templates_en.add(EN_OBJECT.sub("X", record["caption_en"]))
            templates_zh.add(ZH_OBJECT.sub("X", record["caption_zh"]))
    # Several phrasings per language.
    assert len(templates_en) >= 12 and len(templates_zh) >= 12, f"{len(templates_en)} EN, {len(templates_zh)} ZH forms"


def test_held_out_pairs_only_in_test(dataset):
    _, _, splits = dataset
    held = set(scenes.held_out_labels())
    for split in ("train", "validation"):
        seen = {c * len(scenes.SHAPES) + s for r in splits[split] for _, c, s in _objects(r)}
        assert not seen & held, f"{split} contains held-out pairs {sorted(seen & held)}"
        assert not any(r["held_out"] for r in splits[split]), f"{split} has records flagged held_out"
    test_labels = {int(r["label"]) for r in splits["test"]}
    assert held <= test_labels, f"test lacks held-out subjects {sorted(held - test_labels)}"
    flags = [bool(r["held_out"]) for r in splits["test"]]
    expected = [any(c * 4 + s in held for _, c, s in _objects(r)) for r in splits["test"]]
    assert flags == expected, "held_out flags disagree with the objects"
    # Many more draws than the fixture holds: sampling for training never yields a held-out pair.
    rng = np.random.default_rng(0)
    drawn = {o.label for _ in range(5000) for o in scenes.sample_scene(rng, allow_held_out=False).objects}
    assert drawn == set(range(24)) - held, f"training draws cover {sorted(drawn)}"
    assert [n.split()[0] for n in np.asarray(scenes.class_names("en"))[sorted(held)]] == ["red", "yellow", "green", "blue"]


def test_generation_is_deterministic_and_stored_faithfully(dataset):
    builder, _, splits = dataset
    config = builder.builder_config
    for split in scenes.SPLITS:
        for record in splits[split][:40]:
            index = int(record["index"])
            candidate = scenes.generate_example(config.seed, split, index, 64)
            for key in ("caption_en", "caption_zh", "label", "num_objects", "colours", "shapes", "sizes", "centres"):
                assert np.array_equal(candidate[key], record[key]), f"{split} example {index}: {key} differs"
            again = scenes.generate_example(config.seed, split, index, 64)
            assert np.array_equal(candidate["image"], again["image"]), f"{split} example {index} renders differently"
            stored = np.asarray(Image.open(io.BytesIO(scenes.encode_jpeg(candidate["image"]))))
            assert np.array_equal(record["image"], stored), (
                f"{split} example {index}: the stored image is not the JPEG of the rendering (max diff "
                f"{np.abs(record['image'].astype(int) - stored).max()})")
    other = scenes.generate_example(config.seed + 1, "train", 0, 64)
    assert not np.array_equal(other["image"], scenes.generate_example(config.seed, "train", 0, 64)["image"])
    small = scenes.generate_example(0, "train", 0, 32)["image"]
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8, f"32 px image {small.shape} {small.dtype}"


def test_load_split_and_vocabulary(dataset):
    builder, data_dir, splits = dataset
    for lang in ("en", "zh"):
        data = scenes.load_split("test", data_dir=data_dir, config=builder.builder_config, lang=lang)
        n = len(splits["test"])
        assert data["images"].shape == (n, 64, 64, 3) and data["images"].dtype == np.uint8, data["images"].shape
        assert data["labels"].shape == (n,) and len(data["captions"]) == n, (data["labels"].shape, len(data["captions"]))
        assert data["class_names"] == scenes.class_names(lang) and len(data["class_names"]) == 24
        assert data["captions"] == [r[f"caption_{lang}"] for r in splits["test"]], f"{lang} captions differ"
        assert np.array_equal(data["labels"], [r["label"] for r in splits["test"]]), "labels differ"
        vocabulary = set(scenes.vocabulary(lang))
        for caption in data["captions"]:
            tokens = (caption.replace(".", " . ").replace(",", " , ").replace(":", " : ").split()
                      if lang == "en" else list(caption))
            assert set(tokens) <= vocabulary, f"{caption!r}: {set(tokens) - vocabulary} not in the vocabulary"
    assert scenes.class_names("zh")[0] == "红色圆形" and scenes.class_names("en")[0] == "red circle"
    with pytest.raises(ValueError, match="split"):
        scenes.load_split("dev", data_dir=data_dir)


def test_concurrent_prepare_generates_once(tmp_path):
    """Two preparations racing for one data_dir: one generates, the other waits and reuses it, and
    no partial directory is left behind."""
    import threading

    config = scenes.scenes_config(image_size=16, num_train=400, num_validation=4, num_test=8, seed=5)
    builders, errors = [], []

    def run():
        try:
            builders.append(scenes.prepare(config, data_dir=str(tmp_path)))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(builders) == 2, f"errors {errors}"
    sizes = [len(b.as_data_source("train")) for b in builders]
    assert sizes == [400, 400], f"train sizes {sizes}"
    entries = sorted(os.listdir(tmp_path / "altjax_scenes" / config.name))
    assert entries == ["1.0.0"], f"left in the dataset directory: {entries}"
