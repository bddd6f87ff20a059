"""``altjax_scenes``: an embedded, synthetic image-text dataset with parallel English/Chinese captions.

Each example is a small RGB scene of one or two flat-shaded objects (a shape in a colour, small or
large) on a noisy, softly lit background, with an English and a Chinese caption written from the
same attributes in several phrasings: the position of a lone object ("a small red circle on the
left") or the relation between two ("a big blue square above a little yellow diamond"). The
dataset is generated offline and deterministically from a seed (nothing is downloaded), in a few
seconds at the default size, and stored as a tensorflow-datasets ArrayRecord dataset that
tensorflow-datasets reads without TensorFlow.

Zero-shot generalisation is measurable: the colour x shape pairs in :data:`HELD_OUT` never appear
(as either object) in ``train`` or ``validation``, while ``test`` draws every pair uniformly, so a
model must compose a colour it has seen with a shape it has seen in a new way. ``label`` is the
colour-shape class of the scene's subject: the lone object, or the object whose relation to the
other the captions state; :func:`class_names` gives its names in either language for zero-shot
prompts.

Features: ``image`` (uint8 HxWx3, JPEG-encoded), ``caption_en``, ``caption_zh``, ``label``,
``num_objects`` (1 or 2), per object ``colours``/``shapes``/``sizes`` (int32 (2,), -1 where there
is no second object) and ``centres`` (float32 (2, 2), (x, y) as fractions of the image width and
height, from the top left), ``position`` and ``relation`` (class labels whose index 0 is "none"),
``held_out`` (whether any object is a held-out pair), and ``index`` (the example's number in its
split: tfds stores examples in a shuffled order, and :func:`generate_example` with this number
regenerates it).

tensorflow_datasets is imported when the dataset is first prepared or read (:func:`prepare`,
:func:`load_split`, :func:`source`, :func:`scenes_config`, or the classes ``AltjaxScenes`` and
``ScenesConfig``), not with this module; ``tfds.builder("altjax_scenes")`` knows the name from then on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import io
import os
from typing import Any

import numpy as np
from PIL import Image

# (English, Chinese, RGB). Saturated colours, far from each other and from the grey background.
COLOURS: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("red", "红色", (210, 40, 40)),
    ("orange", "橙色", (245, 135, 25)),
    ("yellow", "黄色", (235, 215, 45)),
    ("green", "绿色", (45, 165, 65)),
    ("blue", "蓝色", (40, 85, 215)),
    ("purple", "紫色", (140, 55, 185)),
)
SHAPES: tuple[tuple[str, str], ...] = (
    ("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("diamond", "菱形"),
)
# (English words, Chinese words). The first word is the canonical one, the others vary captions.
SIZES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("small", "little"), ("小",)),
    (("large", "big"), ("大",)),
)
POSITIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("left", ("on the left", "on the left side"), ("左边", "左侧")),
    ("right", ("on the right", "on the right side"), ("右边", "右侧")),
    ("top", ("at the top", "near the top"), ("上方", "顶部")),
    ("bottom", ("at the bottom", "near the bottom"), ("下方", "底部")),
    ("centre", ("in the middle", "in the centre"), ("中间", "中央")),
)
# (name, English phrases "A ... B", English phrase for "B with A ...", Chinese "A在B的...").
RELATIONS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("left of", ("to the left of", "left of"), "to its left", "左边"),
    ("right of", ("to the right of", "right of"), "to its right", "右边"),
    ("above", ("above", "over"), "above it", "上方"),
    ("below", ("below", "under"), "below it", "下方"),
)
# Colour x shape pairs never drawn in train or validation: each shape and four of the colours
# are held out once, so every colour and every shape is still seen in training.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("yellow", "circle"), ("green", "diamond"), ("blue", "square"),
)
SPLITS = ("train", "validation", "test")
NAME = "altjax_scenes"

# Object half-extent r as a fraction of the image side, per size: uniform in these ranges.
_RADIUS = ((0.075, 0.09), (0.13, 0.15))
# Centre ranges (x range, y range) of a lone object per position; with r <= 0.15 and the widest
# shape reaching 1.25 r, every object stays inside the image.
_POSITION_BOXES = (
    ((0.2, 0.3), (0.4, 0.6)), ((0.7, 0.8), (0.4, 0.6)), ((0.4, 0.6), (0.2, 0.3)),
    ((0.4, 0.6), (0.7, 0.8)), ((0.44, 0.56), (0.44, 0.56)),
)
_SUPERSAMPLE = 3  # anti-aliasing: coverage is averaged over 3x3 sub-pixels


def _pair_index(colour: int, shape: int) -> int:
    return colour * len(SHAPES) + shape


_HELD_OUT_IDS = frozenset(
    _pair_index([c[0] for c in COLOURS].index(c), [s[0] for s in SHAPES].index(s)) for c, s in HELD_OUT)


def class_names(lang: str = "en") -> list[str]:
    """Names of the ``label`` classes (colour + shape), "red circle" / "红色圆形", in label order."""
    if lang == "en":
        return [f"{c[0]} {s[0]}" for c in COLOURS for s in SHAPES]
    if lang == "zh":
        return [f"{c[1]}{s[1]}" for c in COLOURS for s in SHAPES]
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def held_out_labels() -> list[int]:
    """The labels of the held-out colour-shape pairs (absent from train and validation)."""
    return sorted(_HELD_OUT_IDS)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: indices into COLOURS, SHAPES and SIZES, half-extent and centre as image fractions."""

    colour: int
    shape: int
    size: int
    radius: float
    x: float
    y: float

    @property
    def label(self) -> int:
        return _pair_index(self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
    """The attributes of one image. ``position`` is set for one object, ``relation`` for two
    (``objects[0]`` is in that relation to ``objects[1]``)."""

    objects: tuple[SceneObject, ...]
    position: int | None
    relation: int | None


def _sample_pair(rng: np.random.Generator, allow_held_out: bool) -> tuple[int, int]:
    while True:
        colour, shape = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
        if allow_held_out or _pair_index(colour, shape) not in _HELD_OUT_IDS:
            return colour, shape


def _sample_object(rng: np.random.Generator, allow_held_out: bool, x: float, y: float) -> SceneObject:
    colour, shape = _sample_pair(rng, allow_held_out)
    size = int(rng.integers(len(SIZES)))
    return SceneObject(colour, shape, size, float(rng.uniform(*_RADIUS[size])), x, y)


def sample_scene(rng: np.random.Generator, *, allow_held_out: bool) -> Scene:
    """Draws the attributes of one scene: one or two objects with equal probability."""
    if rng.random() < 0.5:
        position = int(rng.integers(len(POSITIONS)))
        (x0, x1), (y0, y1) = _POSITION_BOXES[position]
        obj = _sample_object(rng, allow_held_out, float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))
        return Scene((obj,), position, None)
    relation = int(rng.integers(len(RELATIONS)))
    # The subject sits in the near band, the other object in the far band along the relation's
    # axis (0.4 apart at least: two large objects reach 2 * 1.25 * 0.15 = 0.375), and the two are
    # at most 0.15 apart across it, so the relation is unambiguous.
    near, far = float(rng.uniform(0.2, 0.3)), float(rng.uniform(0.7, 0.8))
    across = float(rng.uniform(0.35, 0.65))
    other = float(np.clip(across + rng.uniform(-0.15, 0.15), 0.3, 0.7))
    first, second = (near, far) if relation in (0, 2) else (far, near)
    if relation in (0, 1):
        a = _sample_object(rng, allow_held_out, first, across)
        b = _sample_object(rng, allow_held_out, second, other)
    else:
        a = _sample_object(rng, allow_held_out, across, first)
        b = _sample_object(rng, allow_held_out, other, second)
    return Scene((a, b), None, relation)


def _coverage(obj: SceneObject, size: int, shift: float = 0.0) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage of one shape: the pixel window around it and the fraction of each
    window pixel inside the shape (an inside-test on a supersampled grid, averaged)."""
    cx, cy, r = obj.x + shift, obj.y + shift, obj.radius
    lo_x, hi_x = max(0, int((cx - 1.3 * r) * size)), min(size, int((cx + 1.3 * r) * size) + 2)
    lo_y, hi_y = max(0, int((cy - 1.3 * r) * size)), min(size, int((cy + 1.3 * r) * size) + 2)
    step = 1 / (size * _SUPERSAMPLE)
    dx = ((np.arange(lo_x * _SUPERSAMPLE, hi_x * _SUPERSAMPLE, dtype=np.float32) + 0.5) * step - cx)[None, :]
    dy = ((np.arange(lo_y * _SUPERSAMPLE, hi_y * _SUPERSAMPLE, dtype=np.float32) + 0.5) * step - cy)[:, None]
    name = SHAPES[obj.shape][0]
    if name == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif name == "square":
        inside = (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    elif name == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= 1.25 * r
    else:  # an upright isosceles triangle, apex up, its bounding box centred on the object centre
        t = (dy + 1.1 * r) / (2.2 * r)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= 1.2 * r * t)
    h, w = hi_y - lo_y, hi_x - lo_x
    cover = inside.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).sum(axis=(1, 3), dtype=np.float32) / _SUPERSAMPLE**2
    return slice(lo_y, hi_y), slice(lo_x, hi_x), cover[..., None]


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as a uint8 (image_size, image_size, 3) image.

    Background: a vertical gradient between two muted greys with a slight tint, plus sensor-like
    noise. Objects: their colour (jittered a little) lit from the top left, over a soft shadow.
    """
    size = image_size
    top = rng.uniform(110, 200) + rng.uniform(-12, 12, 3)
    bottom = rng.uniform(80, 170) + rng.uniform(-12, 12, 3)
    rows = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None, None]
    oy, ox = rng.integers(size, size=2)
    image = (top + (bottom - top) * rows).astype(np.float32) + _noise_tile(size)[oy:oy + size, ox:ox + size]
    for obj in scene.objects:
        ys, xs, shadow = _coverage(obj, size, shift=0.2 * obj.radius)
        image[ys, xs] *= 1 - 0.3 * shadow
    pixel = (np.arange(size, dtype=np.float32) + 0.5) / size
    for obj in scene.objects:
        ys, xs, cover = _coverage(obj, size)
        colour = np.asarray(COLOURS[obj.colour][2], np.float32) * rng.uniform(0.92, 1.05) + rng.normal(0, 5, 3)
        # Light from the top left: +-12% brightness across the object.
        light = 1 - 0.12 * np.clip(((pixel[None, xs] - obj.x) + (pixel[ys, None] - obj.y)) / (2 * obj.radius), -1, 1)
        noise = _noise_tile(size)[oy:oy + size, ox:ox + size][ys, xs]
        image[ys, xs] = image[ys, xs] * (1 - cover) + (colour * light[..., None] + noise) * cover
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _noise_tile(size: int) -> np.ndarray:
    """Sensor-like noise (sigma 3 levels) for every image of a size; each image takes a window at
    a random offset. Drawing fresh noise per image would double the rendering time."""
    return np.random.default_rng(size).normal(0, 3, (2 * size, 2 * size, 3)).astype(np.float32)


def _size_word(obj: SceneObject, lang: str, rng: np.random.Generator) -> str:
    words = SIZES[obj.size][0 if lang == "en" else 1]
    return words[int(rng.integers(len(words)))]


def _en_object(obj: SceneObject, rng: np.random.Generator) -> str:
    return f"{_size_word(obj, 'en', rng)} {COLOURS[obj.colour][0]} {SHAPES[obj.shape][0]}"


def _zh_object(obj: SceneObject, rng: np.random.Generator) -> str:
    size, colour, shape = _size_word(obj, "zh", rng), COLOURS[obj.colour][1], SHAPES[obj.shape][1]
    # "小的红色圆形" or "红色的小圆形": both are natural, so both occur.
    return f"{size}的{colour}{shape}" if rng.random() < 0.5 else f"{colour}的{size}{shape}"


def caption(scene: Scene, lang: str, rng: np.random.Generator) -> str:
    """A caption of the scene in English ("en") or Chinese ("zh"), in one of several phrasings."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if lang == "en":
        if scene.position is not None:
            obj, where = _en_object(scene.objects[0], rng), pick(POSITIONS[scene.position][1])
            return pick((f"a {obj} {where}.", f"there is a {obj} {where}.", f"{where}, a {obj}.",
                         f"a photo of a {obj} {where}.", f"the picture shows a {obj} {where}."))
        a, b = scene.objects
        rel = RELATIONS[scene.relation]
        sa, sb = _en_object(a, rng), _en_object(b, rng)
        short_a = f"{COLOURS[a.colour][0]} {SHAPES[a.shape][0]}"
        short_b = f"{COLOURS[b.colour][0]} {SHAPES[b.shape][0]}"
        return pick((f"a {sa} {pick(rel[1])} a {sb}.", f"there is a {sa} {pick(rel[1])} a {sb}.",
                     f"a {sb} with a {sa} {rel[2]}.",
                     f"a {sa} and a {sb}: the {short_a} is {pick(rel[1])} the {short_b}."))
    if lang == "zh":
        if scene.position is not None:
            obj, where = _zh_object(scene.objects[0], rng), pick(POSITIONS[scene.position][2])
            return pick((f"{where}有一个{obj}。", f"一个{obj}在{where}。", f"图中{where}是一个{obj}。",
                         f"画面的{where}有一个{obj}。"))
        a, b = scene.objects
        rel = RELATIONS[scene.relation][3]
        sa, sb = _zh_object(a, rng), _zh_object(b, rng)
        short_a = f"{COLOURS[a.colour][1]}{SHAPES[a.shape][1]}"
        short_b = f"{COLOURS[b.colour][1]}{SHAPES[b.shape][1]}"
        return pick((f"{sa}在{sb}的{rel}。", f"{sb}的{rel}有一个{sa}。",
                     f"图中有一个{sa}和一个{sb}，{short_a}在{short_b}的{rel}。"))
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def vocabulary(lang: str) -> list[str]:
    """Every token the captions of ``lang`` can contain: English words and punctuation, or the
    Chinese characters and punctuation. For building a tokenizer that covers the dataset."""
    rng = np.random.default_rng(0)
    words: set[str] = set()
    # Enough random scenes and phrasings to visit every template and word (checked by the tests).
    for _ in range(3000):
        text = caption(sample_scene(rng, allow_held_out=True), lang, rng)
        if lang == "en":
            words.update(text.replace(".", " . ").replace(",", " , ").replace(":", " : ").split())
        else:
            words.update(text)
    return sorted(words)


def _split_seed(seed: int, split: str) -> list[int]:
    return [seed, SPLITS.index(split)]


def generate_example(seed: int, split: str, index: int, image_size: int) -> dict[str, Any]:
    """Example ``index`` of ``split``: a function of its arguments only (so generation can run in
    any order or in parallel). The image is a uint8 array; the builder stores it JPEG-encoded."""
    rng = np.random.default_rng(_split_seed(seed, split) + [index])
    scene = sample_scene(rng, allow_held_out=split == "test")
    image = render(scene, image_size, rng)
    objs = scene.objects
    pad = lambda values, fill: np.asarray(values + [fill] * (2 - len(values)), np.int32)  # noqa: E731
    centres = np.full((2, 2), -1.0, np.float32)
    centres[:len(objs)] = [(o.x, o.y) for o in objs]
    return {
        "image": image,
        "caption_en": caption(scene, "en", rng),
        "caption_zh": caption(scene, "zh", rng),
        "label": objs[0].label,
        "num_objects": np.int32(len(objs)),
        "colours": pad([o.colour for o in objs], -1),
        "shapes": pad([o.shape for o in objs], -1),
        "sizes": pad([o.size for o in objs], -1),
        "centres": centres,
        "position": 0 if scene.position is None else scene.position + 1,
        "relation": 0 if scene.relation is None else scene.relation + 1,
        "held_out": any(o.label in _HELD_OUT_IDS for o in objs),
        "index": np.int32(index),
    }


def encode_jpeg(image: np.ndarray) -> bytes:
    """The stored form of an image: JPEG at quality 95 without chroma subsampling, which keeps
    colours within a few levels and encodes and decodes several times faster than PNG (the
    background noise makes PNG large and slow)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="jpeg", quality=95, subsampling=0)
    return buffer.getvalue()


_PRESETS = {
    "64px": dict(image_size=64),
    "32px": dict(image_size=32),
    "128px": dict(image_size=128, num_train=20_000, num_validation=2_000, num_test=2_000),
}


# tensorflow_datasets (about 300 modules, 0.4 s after jax) is imported when the dataset itself is
# prepared or read, not with this module: the scenes tokenizers need only the captions' words, and
# a run on WebDataset or TFRecord files of scenes never opens the tfds dataset. Its builder
# classes subclass tfds' own, so they are defined then too, once.
@functools.cache
def _tfds():
    """``(tfds, ScenesConfig, AltjaxScenes)``; defining AltjaxScenes registers it with tfds."""
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class ScenesConfig(tfds.core.BuilderConfig):
        """Image side in pixels, number of examples per split, and the generation seed."""

        image_size: int = 64
        num_train: int = 10_000
        num_validation: int = 1_000
        num_test: int = 1_000
        seed: int = 0

    class AltjaxScenes(tfds.core.GeneratorBasedBuilder):
        """Synthetic one- and two-object scenes with parallel English/Chinese captions (see the module
        docstring). Generated locally from the config's seed; nothing is downloaded."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release."}
        BUILDER_CONFIGS = [
            ScenesConfig(name=name, description=f"{settings['image_size']} px scenes", **{**settings})
            for name, settings in _PRESETS.items()
        ]
        DEFAULT_CONFIG_NAME = "64px"

        def _info(self) -> tfds.core.DatasetInfo:
            size = self.builder_config.image_size
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__.split("\n\n")[0],
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
                    "caption_en": tfds.features.Text(),
                    "caption_zh": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=class_names("en")),
                    "num_objects": tfds.features.Scalar(dtype=np.int32),
                    "colours": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "shapes": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "sizes": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "centres": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
                    "position": tfds.features.ClassLabel(names=["none"] + [p[0] for p in POSITIONS]),
                    "relation": tfds.features.ClassLabel(names=["none"] + [r[0] for r in RELATIONS]),
                    "held_out": tfds.features.Scalar(dtype=np.bool_),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            config = self.builder_config
            counts = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
            return {split: self._generate_examples(split, n) for split, n in counts.items()}

        def _generate_examples(self, split: str, num_examples: int):
            config = self.builder_config
            for index in range(num_examples):
                example = generate_example(config.seed, split, index, config.image_size)
                # tfds would encode the array with TensorFlow; JPEG bytes from PIL keep TF out.
                example["image"] = encode_jpeg(example["image"])
                yield index, example

    # Named as module attributes (:func:`__getattr__`), so that pickle finds them by reference.
    for cls in (ScenesConfig, AltjaxScenes):
        cls.__qualname__ = cls.__name__
    return tfds, ScenesConfig, AltjaxScenes


def __getattr__(name: str):
    # ScenesConfig and AltjaxScenes exist once tensorflow_datasets is imported (see _tfds).
    if name in ("ScenesConfig", "AltjaxScenes"):
        _, config_class, builder_class = _tfds()
        return config_class if name == "ScenesConfig" else builder_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def scenes_config(image_size: int = 64, num_train: int = 10_000, num_validation: int = 1_000,
                  num_test: int = 1_000, seed: int = 0):
    """The builder config (a ``ScenesConfig``) for these settings: a predefined one ("64px", the
    default, "32px", "128px") when they match it, else a custom config named after the settings."""
    _, config_class, builder_class = _tfds()
    settings = dict(image_size=image_size, num_train=num_train, num_validation=num_validation,
                    num_test=num_test, seed=seed)
    for config in builder_class.BUILDER_CONFIGS:
        if all(getattr(config, k) == v for k, v in settings.items()):
            return config
    name = f"{image_size}px_{num_train}_{num_validation}_{num_test}_seed{seed}"
    return config_class(name=name, description=f"custom: {settings}", **settings)


def default_data_dir() -> str:
    """``$ALTJAX_DATA_DIR``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    for variable in ("ALTJAX_DATA_DIR", "TFDS_DATA_DIR"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    return os.path.expanduser("~/tensorflow_datasets")


@contextlib.contextmanager
def _quiet_tfds():
    # tfds draws progress bars for every split it writes; the demo's console has its own output.
    # tfds keeps the switch in a module global with no getter, so it is read directly to restore it.
    from tensorflow_datasets.core.utils import tqdm_utils

    tfds, _, _ = _tfds()
    before = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(before)


def prepare(config: Any = None, *, data_dir: str | None = None, **settings):
    """The prepared builder (an ``AltjaxScenes``), generating the dataset into ``data_dir`` first
    if it is not there.

    ``config`` is a ``ScenesConfig``, a predefined config name, or None for
    ``scenes_config(**settings)`` (the default "64px" when no settings are given). tfds writes
    into a temporary directory and renames it when complete, so an interrupted preparation leaves
    nothing half-written; a file lock in ``data_dir`` makes concurrent processes on one machine
    wait for the first instead of generating twice (on a filesystem shared between hosts, prepare
    on one host before the others read).
    """
    if config is None:
        config = scenes_config(**settings)
    elif settings:
        raise ValueError("pass either a config or settings for scenes_config, not both")
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Built after taking the lock so that it sees a dataset another process just finished.
        _, _, builder_class = _tfds()
        builder = builder_class(config=config, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            with _quiet_tfds():
                builder.download_and_prepare()
    return builder


def load_split(split: str, *, data_dir: str | None = None, image_size: int = 64, lang: str = "en",
               config: Any = None) -> dict[str, Any]:
    """A whole split in memory, preparing the dataset if needed.

    Returns ``images`` uint8 (N, H, W, 3), ``captions`` (list of N strings in ``lang``), ``labels``
    int32 (N,), ``class_names`` (in ``lang``), and the attributes ``num_objects`` and
    ``held_out`` (N,) for restricting an evaluation to one-object scenes or held-out pairs, in
    the order of generation (example ``i`` of the split first).
    ``config`` overrides ``image_size`` (a ``ScenesConfig`` or a config name).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    builder = prepare(config if config is not None else scenes_config(image_size=image_size), data_dir=data_dir)
    tfds, _, _ = _tfds()
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    records = sorted(source.__getitems__(list(range(len(source)))), key=lambda r: r["index"])
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in records])
    return {
        "images": images,
        "captions": [_text(r[f"caption_{lang}"]) for r in records],
        "labels": np.asarray([r["label"] for r in records], np.int32),
        "class_names": class_names(lang),
        "num_objects": np.asarray([r["num_objects"] for r in records], np.int32),
        "held_out": np.asarray([r["held_out"] for r in records], bool),
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)



def source(split: str, *, data_dir: str | None = None, image_size: int = 64, lang: str = "en",
           config: Any = None):
    """A split as a pipeline source (:class:`altjax.data.sources.TfdsSource`), preparing the
    dataset if needed; its default caption key is ``caption_{lang}``."""
    from altjax.data.sources import TfdsSource

    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    builder = prepare(config if config is not None else scenes_config(image_size=image_size), data_dir=data_dir)
    return TfdsSource(builder, split, image_key="image", caption_key=f"caption_{lang}")
