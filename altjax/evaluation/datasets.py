"""Evaluation sets: folders of images, locally prepared tfds datasets, and the embedded ``scenes`` set.

Two kinds, one per task:

* :class:`ClassificationSet` (zero-shot): images, integer labels and class names.
* :class:`RetrievalSet`: images, captions, and for each caption the index of its image.

Images are kept as a sequence of lazily read items (file paths, encoded bytes, arrays) so that
each process of a multi-process evaluation reads and decodes only its own rows.

``load_dataset(name, task, ...)`` resolves a name in this order: an existing directory (an image
folder, see :func:`image_folder_classification` and :func:`image_folder_retrieval`), ``scenes`` /
``altjax_scenes`` (``altjax.data.scenes``), then the tfds datasets of :data:`TFDS_DATASETS`.
tensorflow_datasets is imported only for those, and it never downloads: the dataset must already
be prepared in ``data_dir`` (default: tfds' own, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
Datasets prepared as ArrayRecord (``--file_format=array_record``) are read by random access
without TensorFlow; tfrecord ones (tfds' default) through tf.data, which needs TensorFlow.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from altjax.data import scenes
from altjax.evaluation.templates import TEMPLATE_SETS

TASKS = ("zeroshot", "retrieval")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLASSNAMES_FILE = "classnames.txt"
CAPTION_FILES = ("captions.jsonl", "captions.tsv")
SCENES_NAMES = ("scenes", "altjax_scenes")
DEFAULT_SCENES_SPLIT = "test"


class DatasetError(ValueError):
    """A dataset that is unknown, missing, malformed, not prepared, or not of the requested kind."""


@dataclasses.dataclass
class ClassificationSet:
    """A zero-shot classification set.

    ``images[i]`` (anything :func:`altjax.evaluation.embed.open_image` reads) has class
    ``labels[i]``, named ``class_names[labels[i]]``. ``templates`` (optional) are the prompts this
    dataset is usually evaluated with; ``lang`` is the language of the class names.
    """

    name: str
    images: Sequence[Any]
    labels: np.ndarray
    class_names: list[str]
    lang: str = "en"
    templates: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels)
        if self.labels.shape != (len(self.images),) or not np.issubdtype(self.labels.dtype, np.integer):
            raise DatasetError(f"{self.name}: labels must be {len(self.images)} integers, one per image, "
                               f"got shape {self.labels.shape} dtype {self.labels.dtype}")
        if len(self.images) == 0:
            raise DatasetError(f"{self.name}: no images")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))
        if bad.size:
            raise DatasetError(f"{self.name}: label {self.labels[bad[0]]} of image {bad[0]} is not one of the "
                               f"{len(self.class_names)} classes")


@dataclasses.dataclass
class RetrievalSet:
    """An image-text retrieval set: caption ``texts[j]`` describes image ``images[text_image_ids[j]]``;
    every image has at least one caption."""

    name: str
    images: Sequence[Any]
    texts: list[str]
    text_image_ids: np.ndarray
    lang: str = "en"

    def __post_init__(self):
        self.text_image_ids = np.asarray(self.text_image_ids)
        if self.text_image_ids.shape != (len(self.texts),):
            raise DatasetError(f"{self.name}: text_image_ids has shape {self.text_image_ids.shape}, "
                               f"expected ({len(self.texts)},), one per caption")
        if len(self.images) == 0:
            raise DatasetError(f"{self.name}: no images")
        ids = self.text_image_ids
        if not np.issubdtype(ids.dtype, np.integer) or ids.size == 0 or ids.min() < 0 or ids.max() >= len(self.images):
            raise DatasetError(f"{self.name}: every caption needs the index of its image in 0..{len(self.images) - 1}")
        counts = np.bincount(ids, minlength=len(self.images))
        if (counts == 0).any():
            raise DatasetError(f"{self.name}: image {int(np.argmin(counts))} has no caption")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str) -> list[str]:
    """Image files under ``root`` (recursively), as sorted paths relative to ``root``."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files if _is_image(f)]
    return sorted(found)


def _display_name(folder: str) -> str:
    return folder.replace("_", " ")


def image_folder_classification(root: str, *, name: Optional[str] = None, lang: str = "en",
                                class_names: Optional[Sequence[str]] = None) -> ClassificationSet:
    """``root/<class>/**/<image>``: one subfolder per class, classes in sorted folder order.

    Class names are the folder names with ``_`` read as a space, unless ``class_names`` are given
    or ``root/classnames.txt`` lists them (one per line, in sorted folder order).
    """
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a directory")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    images, labels, used = [], [], []
    for folder in folders:
        files = list_images(os.path.join(root, folder))
        if files:
            labels += [len(used)] * len(files)
            images += [os.path.join(root, folder, f) for f in files]
            used.append(folder)
    if not used:
        raise DatasetError(f"{root}: no class folders with images (expected {root}/<class>/<image>, "
                           f"image extensions {', '.join(IMAGE_EXTENSIONS)})")
    names_file = os.path.join(root, CLASSNAMES_FILE)
    if class_names is None and os.path.isfile(names_file):
        class_names = read_class_names(names_file)
    if class_names is None:
        class_names = [_display_name(f) for f in used]
    elif len(class_names) != len(used):
        raise DatasetError(f"{root}: {len(class_names)} class names for {len(used)} class folders")
    return ClassificationSet(name=name or _folder_name(root), images=images, labels=np.asarray(labels),
                             class_names=list(class_names), lang=lang)


def read_class_names(path: str) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DatasetError(f"cannot read class names from {path}: {e.strerror or e}") from None
    if not names:
        raise DatasetError(f"{path}: no class names")
    return names


def _folder_name(root: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(root)))


def _read_captions(path: str) -> list[tuple[str, str]]:
    """(image, caption) pairs of a captions file, in file order."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if path.endswith(".jsonl"):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {number}: not valid JSON ({e})") from None
            captions = entry.get("captions", [entry["caption"]] if "caption" in entry else None) \
                if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                    or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DatasetError(f"{path}, line {number}: expected {{\"image\": FILE, \"caption\": TEXT}} or "
                                   f"{{\"image\": FILE, \"captions\": [TEXT, ...]}}")
            pairs += [(entry["image"], c) for c in captions]
    else:
        for number, line in enumerate(lines, start=1):
            if not line.strip() or (number == 1 and line.strip() == "image\tcaption"):
                continue
            image, tab, caption = line.partition("\t")
            if not tab:
                raise DatasetError(f"{path}, line {number}: expected IMAGE<TAB>CAPTION")
            pairs.append((image, caption))
    if not pairs:
        raise DatasetError(f"{path}: no captions")
    return pairs


def image_folder_retrieval(root: str, *, captions: Optional[str] = None, name: Optional[str] = None,
                           lang: str = "en") -> RetrievalSet:
    """A folder of images and a captions file naming them (paths relative to ``root``).

    The captions file is ``captions`` or ``root/captions.jsonl`` or ``root/captions.tsv``:
    JSON lines ``{"image": "a.jpg", "caption": "..."}`` or ``{"image": "a.jpg", "captions": [...]}``,
    or tab-separated ``a.jpg<TAB>caption`` lines (an ``image<TAB>caption`` header is skipped).
    An image may appear on several lines; images are ordered by first appearance, captions by line.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a directory")
    if captions is None:
        found = [os.path.join(root, c) for c in CAPTION_FILES if os.path.isfile(os.path.join(root, c))]
        if not found:
            raise DatasetError(f"{root}: no captions file ({' or '.join(CAPTION_FILES)}) for retrieval")
        captions = found[0]
    elif not os.path.isfile(captions):
        raise DatasetError(f"{captions}: no such captions file")
    pairs = _read_captions(captions)
    order: dict[str, int] = {}
    for image, _ in pairs:
        order.setdefault(image, len(order))
    missing = [image for image in order if not os.path.isfile(os.path.join(root, image))]
    if missing:
        raise DatasetError(f"{captions}: {len(missing)} image(s) not found under {root}, first: {missing[0]}")
    return RetrievalSet(
        name=name or _folder_name(root),
        images=[os.path.join(root, image) for image in order],
        texts=[caption for _, caption in pairs],
        text_image_ids=np.asarray([order[image] for image, _ in pairs]),
        lang=lang,
    )


def _scenes(task: str, split: Optional[str], lang: str, data_dir: Optional[str], name: str):
    try:
        data = scenes.load_split(split or DEFAULT_SCENES_SPLIT, data_dir=data_dir, lang=lang)
    except ImportError as e:  # tensorflow_datasets, which scenes imports only to prepare or read the set
        raise DatasetError(f"the scenes dataset needs tensorflow_datasets (pip install tensorflow-datasets): {e}") from None
    images = np.asarray(data["images"])
    if task == "zeroshot":
        return ClassificationSet(name=name, images=images, labels=np.asarray(data["labels"]),
                                 class_names=list(data["class_names"]), lang=lang)
    captions = list(data["captions"])
    if len(captions) != len(images):
        raise DatasetError(f"{name}: {len(captions)} captions for {len(images)} images, expected one each")
    return RetrievalSet(name=name, images=images, texts=captions, text_image_ids=np.arange(len(images)),
                        lang=lang)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How to read one tfds dataset: its task, default split, and where the features are."""

    task: str
    split: str
    image_key: str = "image"
    label_key: str = "label"
    caption_key: tuple[str, ...] = ()
    templates: Optional[str] = None


TFDS_DATASETS: dict[str, TfdsSpec] = {
    # Karpathy's split of COCO: 5,000 test images with 5 (a few 6 or 7) captions each.
    "coco_captions": TfdsSpec("retrieval", "test", caption_key=("captions", "text")),
    "cifar10": TfdsSpec("zeroshot", "test"),
    "cifar100": TfdsSpec("zeroshot", "test"),
    "imagenet2012": TfdsSpec("zeroshot", "validation", templates="openai_imagenet"),
    "imagenet_v2": TfdsSpec("zeroshot", "test", templates="openai_imagenet"),
    "food101": TfdsSpec("zeroshot", "validation"),
    "oxford_flowers102": TfdsSpec("zeroshot", "test"),
    "oxford_iiit_pet": TfdsSpec("zeroshot", "test"),
    "caltech101": TfdsSpec("zeroshot", "test"),
    "stl10": TfdsSpec("zeroshot", "test"),
}
_WORDNET_ID = re.compile(r"^n\d{8}$")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError(f"tfds datasets need tensorflow_datasets (pip install tensorflow-datasets): {e}") from None
    return tfds


def _lookup(example: dict, keys: Sequence[str]):
    for key in keys:
        example = example[key]
    return example


class ForwardReader(Sequence):
    """A sequence over a stream that is read forward: ``reader[i]`` reads up to item ``i``.

    Reading goes in increasing index order (repeating the last index is free); asking for an
    earlier index restarts the stream. Only the current item is kept in memory, so each process
    of an evaluation streams the data once and decodes only its own rows.
    """

    def __init__(self, open_stream: Callable[[], Iterator[Any]], length: int):
        self._open, self._length = open_stream, length
        self._stream: Optional[Iterator[Any]] = None
        self._index, self._item = -1, None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} items")
        if self._stream is None or index < self._index:
            self._stream, self._index = self._open(), -1
        while self._index < index:
            try:
                self._item = next(self._stream)
            except StopIteration:
                raise DatasetError(f"the stream ended after {self._index + 1} of {self._length} items") from None
            self._index += 1
        return self._item


class _Column(Sequence):
    """One feature of a random-access tfds data source, read when indexed."""

    def __init__(self, source, key: str):
        self._source, self._key = source, key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        return self._source[index][self._key]


def _tfds_reader(tfds, builder, name: str, split: str, image_key: str):
    """``(images, examples)``: the split's encoded images as a lazy sequence, and a function that
    iterates over its examples (images left encoded)."""
    skip = {image_key: tfds.decode.SkipDecoding()}
    file_format = getattr(getattr(builder.info, "file_format", None), "value", "tfrecord")
    if file_format in ("array_record", "parquet"):
        # Random access without TensorFlow.
        source = builder.as_data_source(split=split, decoders=skip)
        return _Column(source, image_key), lambda: (source[i] for i in range(len(source)))
    try:
        import tensorflow  # noqa: F401  (tf.data reads tfrecord datasets)
    except ImportError:
        raise DatasetError(f"tfds dataset {name!r} is stored as {file_format}, which needs tensorflow to read "
                           "(pip install tensorflow), or prepare it with --file_format=array_record") from None
    length = builder.info.splits[split].num_examples

    def examples() -> Iterator[dict]:
        return iter(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False, decoders=skip)))

    # A forward-only stream: each process reads the records in order and decodes only its rows.
    return ForwardReader(lambda: (ex[image_key] for ex in examples()), length), examples


def _tfds(name: str, split: Optional[str], lang: str, data_dir: Optional[str],
          class_names: Optional[Sequence[str]]):
    spec = TFDS_DATASETS[name]
    tfds = _import_tfds()
    split = split or spec.split
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.data_path.exists()
    except Exception as e:  # tfds raises its own types for unknown names, bad versions, bad dirs
        raise DatasetError(f"tfds dataset {name!r}: {e}") from None
    if not prepared:
        raise DatasetError(f"tfds dataset {name!r} is not prepared in {builder.data_path} "
                           f"(prepare it first, e.g. tfds build {name}{f' --data_dir {data_dir}' if data_dir else ''})")
    try:
        builder.info.splits[split]  # also accepts tfds' slices ("test[:1000]") and sums ("val+test")
    except Exception:
        raise DatasetError(f"tfds dataset {name!r} has no split {split!r} (it has {', '.join(builder.info.splits)})") from None
    images, examples = _tfds_reader(tfds, builder, name, split, spec.image_key)
    title = name if split == spec.split else f"{name}:{split}"
    if spec.task == "retrieval":
        texts, ids = [], []
        for i, example in enumerate(examples()):
            captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                        for c in np.asarray(_lookup(example, spec.caption_key)).reshape(-1)]
            texts += captions
            ids += [i] * len(captions)
        return RetrievalSet(name=title, images=images, texts=texts, text_image_ids=np.asarray(ids), lang=lang)
    labels = np.asarray([int(example[spec.label_key]) for example in examples()])
    if class_names is None:
        class_names = list(builder.info.features[spec.label_key].names)
        if any(_WORDNET_ID.match(n) for n in class_names):
            raise DatasetError(f"tfds dataset {name!r} names its classes by WordNet id ({class_names[0]}, ...); "
                               "pass class names (a file with one name per line)")
        class_names = [_display_name(n) for n in class_names]
    templates = TEMPLATE_SETS[spec.templates] if spec.templates and lang == "en" else None
    return ClassificationSet(name=title, images=images, labels=labels, class_names=list(class_names),
                             lang=lang, templates=templates)


def load_dataset(name: str, task: str, *, split: Optional[str] = None, lang: str = "en",
                 data_dir: Optional[str] = None, class_names: Optional[Sequence[str]] = None):
    """The evaluation set ``name`` for ``task`` (``"zeroshot"`` or ``"retrieval"``).

    ``name`` is a directory (image folder), ``scenes``/``altjax_scenes``, or a key of
    ``TFDS_DATASETS``. ``split`` defaults to the dataset's test split; ``lang`` is the language of
    captions and class names (the scenes set generates either); ``data_dir`` is where the scenes
    set or tfds datasets live; ``class_names`` override a classification set's names.
    Raises :class:`DatasetError` for anything that stops the set from loading.
    """
    if task not in TASKS:
        raise DatasetError(f"task must be one of {TASKS}, got {task!r}")
    if os.path.isdir(name):
        if split is not None:
            raise DatasetError(f"{name}: an image folder has no splits (got split {split!r})")
        if task == "zeroshot":
            return image_folder_classification(name, lang=lang, class_names=class_names)
        return image_folder_retrieval(name, lang=lang)
    if name in SCENES_NAMES:
        return _scenes(task, split, lang, data_dir, "scenes")
    if name in TFDS_DATASETS:
        spec = TFDS_DATASETS[name]
        if spec.task != task:
            raise DatasetError(f"{name} is a {spec.task} dataset, not a {task} one")
        return _tfds(name, split, lang, data_dir, class_names)
    known = ", ".join([*SCENES_NAMES, *sorted(TFDS_DATASETS)])
    raise DatasetError(f"unknown dataset {name!r}: not a directory, and not one of {known}")
