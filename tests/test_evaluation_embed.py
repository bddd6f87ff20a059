"""Sharded embedding of evaluation sets, zero-shot / retrieval evaluation, and the dataset sources.

Tolerances: embeddings are unit vectors; the sharded (8 devices, per-device batch 1) and
single-device embeddings of the tiny ALIGN, and the model called directly on the whole set, agree
to 1e-6 absolute (float32: XLA's CPU kernels differ in summation order between batch shapes).
Embeddings of the ``VectorModel`` (chosen by the test) are exact to 1e-6; every metric computed
from the same embeddings is compared exactly, and the two-process run's metrics equal the
one-process metrics exactly.
"""
import io
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from altjax import AlignConfig, AlignModel, AlignProcessor
from altjax.evaluation import (
    ClassificationSet,
    DatasetError,
    Embedder,
    RetrievalSet,
    build_classifier,
    evaluate_retrieval,
    evaluate_zeroshot,
    evaluation_key,
    image_folder_classification,
    image_folder_retrieval,
    load_dataset,
    retrieval_metrics,
)
from altjax.evaluation import datasets as datasets_lib
from altjax.evaluation import embed as embed_lib
from altjax.sharding import make_mesh, sharded_init
from helpers import assert_close
from tests import multihost_eval_worker as worker
from tests.multihost_eval_worker import VectorModel, WordProcessor

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-6


@pytest.fixture(scope="module")
def align_dir(tmp_path_factory):
    return worker.tiny_align_dir(str(tmp_path_factory.getbasetemp() / "tiny-align"))


@pytest.fixture(scope="module")
def align(align_dir):
    return AlignModel.from_pretrained(align_dir), AlignProcessor.from_pretrained(align_dir)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- sharded embedding ----------------------------------------------------------------------------


def test_sharded_embedding_equals_single_device_and_the_model(align):
    model, processor = align
    images, captions, _, _ = worker.eval_data()  # 13 images (two sizes), 26 captions
    assert len(jax.devices()) == 8
    sharded = Embedder(model, processor, mesh=make_mesh(), batch_size=worker.BATCH)
    single = Embedder(model, processor, mesh=make_mesh(devices=jax.devices()[:1]), batch_size=worker.BATCH)
    image_embeds, text_embeds = sharded.embed_images(images), sharded.embed_texts(captions)
    assert image_embeds.shape == (13, 40) and text_embeds.shape == (len(captions), 40)
    assert image_embeds.dtype == np.float32 and text_embeds.dtype == np.float32
    assert_close(image_embeds, single.embed_images(images), atol=ATOL, what="images: 8-device vs 1-device")
    assert_close(text_embeds, single.embed_texts(captions), atol=ATOL, what="texts: 8-device vs 1-device")

    # The model itself on the whole set at once (no padding, no batching), jitted for speed.
    inputs = processor(text=captions, images=images, padding="max_length", truncation=True, max_length=64)
    graphdef, state = nnx.split(model)
    direct = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))(state, {k: jnp.asarray(v) for k, v in inputs.items()})
    assert_close(image_embeds, direct.image_embeds, atol=ATOL, what="images: Embedder vs model(**inputs)")
    assert_close(text_embeds, direct.text_embeds, atol=ATOL, what="texts: Embedder vs model(**inputs)")
    # Rows far apart compared with the tolerance, so the comparisons above also check the order.
    for what, x in (("images", image_embeds), ("texts", text_embeds)):
        distances = np.linalg.norm(x[:, None] - x[None], axis=-1) + np.eye(len(x))
        assert distances.min() > 1e-3, f"two {what} embeddings only {distances.min():.1e} apart"


def test_batch_size_rounding_and_paths_and_bytes(align, tmp_path):
    model, processor = align
    embedder = Embedder(model, processor, batch_size=5)
    assert embedder.batch_size == 8, f"batch 5 on 8 devices should round up to 8, got {embedder.batch_size}"
    assert embedder.text_length == 64, "ALIGN's processor pads texts to 64 tokens"
    images, _, _, _ = worker.eval_data()
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    encoded = [open(p, "rb").read() for p in paths]
    from_arrays = embedder.embed_images(images[:3])
    assert_close(embedder.embed_images(paths), from_arrays, atol=0, what="images read from PNG paths vs arrays")
    assert_close(embedder.embed_images(encoded), from_arrays, atol=0, what="images from encoded bytes vs arrays")
    with pytest.raises(ValueError, match="no images to embed"):
        embedder.embed_images([])
    with pytest.raises(OSError, match="cannot read image"):
        embedder.embed_images([str(tmp_path / "missing.png")])


def test_unreadable_images_are_skipped_and_counted_or_raise(align, tmp_path):
    # 8 devices, batch 8: the broken bytes (row 5) sit on device 5 of batch 0, the broken file
    # (row 9) on device 1 of batch 1. Every process sees the same rows skipped.
    model, processor = align
    embedder = Embedder(model, processor, batch_size=8)
    images, _, _, _ = worker.eval_data()
    good = [np.asarray(x) for x in images[:11]]
    items = list(good)
    items[5] = b"\x89PNG\r\n\x1a\n not really"
    broken_file = tmp_path / "cut.png"
    Image.fromarray(good[9]).save(broken_file)
    broken_file.write_bytes(broken_file.read_bytes()[:40])
    items[9] = str(broken_file)
    skipped = embed_lib.SkippedImages()
    embeds = embedder.embed_images(items, skipped=skipped)
    assert skipped.indices == [5, 9] and skipped.count == 2, skipped
    assert skipped.examples[0].startswith("images[5]: cannot read image (") and skipped.examples[1].startswith(
        f"{broken_file}: cannot read image ("), skipped.examples
    assert skipped.as_dict() == {"count": 2, "examples": skipped.examples}
    assert np.isnan(embeds[[5, 9]]).all() and np.isfinite(np.delete(embeds, [5, 9], axis=0)).all()
    keep = [i for i in range(11) if i not in (5, 9)]
    assert_close(embeds[keep], embedder.embed_images([good[i] for i in keep]), atol=ATOL,
                 what="readable images embedded beside unreadable ones")
    with pytest.raises(embed_lib.UnreadableImageError, match=r"^images\[5\]: cannot read image \(.+\)$"):
        embedder.embed_images(items)
    with pytest.raises(OSError, match=f"^{broken_file}: cannot read image"):
        embedder.embed_images(items[6:])


# --- a model whose embeddings the test chooses ------------------------------------------------------

CLASSES = ["cat", "dog", "car", "tree", "boat", "lamp"]
COMMON = ["a", "photo", "of", "drawing"]
TEMPLATES = ["a photo of {}", "a drawing of {}", "{}"]


def vector_model(*, sharded_mesh=None):
    """Class words point along their own axis (0..5), the other words along axes 6..8: every
    class embedding has the same positive weight on its own axis and none on the others'."""
    words = CLASSES + COMMON
    table = np.zeros((len(words) + 1 + 5, 9), np.float32)  # row 0: padding; 16 rows split over 8 devices
    for c in range(len(CLASSES)):
        table[1 + c, c] = 3.0
    table[1 + words.index("a"), 8] = 1.0
    table[1 + words.index("photo"), 6] = 1.0
    table[1 + words.index("of"), 8] = 0.5
    table[1 + words.index("drawing"), 7] = 1.0
    if sharded_mesh is None:
        model = VectorModel(table, rngs=nnx.Rngs(0))
    else:
        model = sharded_init(lambda rngs: VectorModel(table, rngs=rngs), sharded_mesh, fsdp_min_size=16)
    return model, WordProcessor(words), table, words


def test_classifier_is_the_template_average(capsys):
    model, processor, table, words = vector_model()
    classifier = build_classifier(Embedder(model, processor, batch_size=8), CLASSES, TEMPLATES)
    # By hand: each prompt's embedding is the sum of its words' rows; normalise, average, normalise.
    expected = []
    for name in CLASSES:
        prompts = [t.replace("{}", name) for t in TEMPLATES]
        vectors = unit([sum(table[1 + words.index(w)] for w in p.split()) for p in prompts])
        expected.append(unit(vectors.mean(axis=0)))
    assert_close(classifier, np.stack(expected), atol=ATOL, what="zero-shot classifier vs hand computation")


def test_zeroshot_accuracy_is_exactly_as_constructed():
    model, processor, _, _ = vector_model()
    # Image i has label y and points mostly at class p: "ok" (p = y), "near" (p != y, y second:
    # a top-5 hit), "far" (p != y, y last of 6: a top-5 miss).
    cases = [(0, 0, "ok"), (0, 0, "ok"), (1, 1, "ok"), (1, 2, "near"), (2, 2, "ok"),
             (2, 4, "far"), (3, 3, "ok"), (4, 0, "near"), (5, 1, "far"), (5, 5, "ok")]
    images, labels = [], []
    for i, (y, p, kind) in enumerate(cases):
        v = np.zeros(9, np.float32)
        v[p] += 1.0
        v[y] += {"ok": 0.0, "near": 0.5, "far": -1.0}[kind]
        v[(p + 1 + i % 4) % 6 if (p + 1 + i % 4) % 6 != y else (p + 5) % 6] += 0.25 if kind != "far" else 0.0
        images.append(v)
        labels.append(y)
    dataset = ClassificationSet("constructed", images, np.asarray(labels), CLASSES)
    metrics = evaluate_zeroshot(model, processor, dataset, templates=TEMPLATES, batch_size=8)
    # 6 of 10 right; the two "far" images miss the top 5; per class: 2/2, 1/2, 1/2, 1/1, 0/1, 1/2.
    assert metrics["top1"] == 60.0, f"top1 {metrics['top1']} != 60"
    assert metrics["top5"] == 80.0, f"top5 {metrics['top5']} != 80"
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * 3.5 / 6, abs=1e-12), \
        f"mean_per_class_recall {metrics['mean_per_class_recall']} != {100 * 3.5 / 6}"


def test_retrieval_equals_the_metric_on_the_embeddings():
    model, processor, table, words = vector_model()
    rng = np.random.default_rng(3)
    images = [rng.normal(size=9).astype(np.float32) for _ in range(11)]
    texts, ids = [], []
    for i in range(11):
        for k in range(1 + i % 3):
            texts.append(" ".join(rng.choice(words, 2 + k)))
            ids.append(i)
    metrics = evaluate_retrieval(model, processor, RetrievalSet("toy", images, texts, ids), batch_size=8)
    text_vectors = [sum(table[1 + words.index(w)] for w in t.split()) for t in texts]
    expected = retrieval_metrics(unit(images).astype(np.float32), unit(text_vectors).astype(np.float32), ids)
    assert metrics == expected, f"evaluate_retrieval {metrics} != retrieval_metrics on the embeddings {expected}"


def test_eval_mode_sharded_state_and_no_recompilation():
    mesh = make_mesh()
    model, processor, table, words = vector_model()
    sharded, _, _, _ = vector_model(sharded_mesh=mesh)
    assert sharded.table[...].sharding.spec != jax.sharding.PartitionSpec(), "the test table should be sharded"
    texts = ["a photo of cat", "drawing", "of of of lamp boat"] * 3
    images = [np.arange(9, dtype=np.float32) + i for i in range(9)]
    expected_t = unit([sum(table[1 + words.index(w)] for w in t.split()) for t in texts])
    for what, m in (("replicated", model), ("FSDP-sharded", sharded)):
        embedder = Embedder(m, processor, mesh=mesh, batch_size=8)
        # Dropout is active in the module: exact results mean it was switched off.
        assert_close(embedder.embed_texts(texts), expected_t, atol=ATOL, what=f"{what} texts (dropout must be off)")
        assert_close(embedder.embed_images(images), unit(images), atol=ATOL, what=f"{what} images")
    kept = embed_lib._place_state(nnx.split(sharded)[1], mesh)
    assert kept["table"][...].sharding == sharded.table[...].sharding, "a state sharded on the mesh must stay as it is"

    # A train loop evaluates a changing model: new weights, same graph, no new compilation.
    before = embed_lib._embed_batch._cache_size()
    model.table[...] = model.table[...] * 2.0
    Embedder(model, processor, mesh=mesh, batch_size=8).embed_texts(texts)
    assert embed_lib._embed_batch._cache_size() == before, "changed weights recompiled the embedding function"


def test_progress_only_on_multi_batch_runs(capsys):
    model, processor, _, _ = vector_model()
    embedder = Embedder(model, processor, batch_size=8, progress=True)
    embedder.embed_texts(["a photo of cat"] * 8)
    assert capsys.readouterr().err == "", "a single batch should not report progress"
    embedder.embed_texts(["a photo of cat"] * 20)
    err = capsys.readouterr().err
    assert "embedding texts: 20/20 texts (100%)" in err, f"progress line missing: {err!r}"
    Embedder(model, processor, batch_size=8).embed_texts(["cat"] * 20)
    assert capsys.readouterr().err == "", "progress is off by default"


def test_evaluation_key():
    assert evaluation_key("retrieval", "coco_captions", "en") == "retrieval/coco_captions/en"
    assert evaluation_key("zeroshot", "scenes", "zh") == "zeroshot/scenes/zh"
    with pytest.raises(ValueError, match="task"):
        evaluation_key("linear_probe", "x", "en")


# --- two processes ----------------------------------------------------------------------------------

NUM_PROCESSES, DEVICES_PER_PROCESS, TIMEOUT_S = 2, 4, 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(align_dir, tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    procs, outputs, logs = [], [], []
    for process_id in range(NUM_PROCESSES):
        outputs.append(tmp_path / f"process{process_id}.npz")
        # Files, not pipes: a process blocked on a full pipe would stall the other's collectives.
        logs.append(tmp_path / f"process{process_id}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "multihost_eval_worker.py"), str(process_id),
                 str(NUM_PROCESSES), str(port), align_dir, str(outputs[-1])],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    # The reference runs here while the two processes start up.
    reference = worker.compute(make_mesh(), align_dir)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "\n".join(f"--- process {i} (exit code {p.returncode}):\n{log.read_text()[-4000:]}"
                       for i, (p, log) in enumerate(zip(procs, logs)))
    assert all(p.returncode == 0 for p in procs), f"a process failed or timed out\n{report}"
    for process_id, out in enumerate(outputs):
        got = dict(np.load(out))
        assert int(got.pop("process_count")) == NUM_PROCESSES and int(got.pop("global_devices")) == 8, \
            f"process {process_id}: not a {NUM_PROCESSES}-process, 8-device run"
        assert sorted(got) == sorted(reference), f"process {process_id}: outputs {sorted(set(got) ^ set(reference))} differ"
        for name, ref in reference.items():
            if name.startswith("metric/"):
                assert float(got[name]) == float(ref), f"process {process_id}: {name} {got[name]} != one-process {ref}"
            else:
                assert_close(got[name], ref, atol=ATOL, what=f"process {process_id}: {name}")


# --- dataset sources ------------------------------------------------------------------------------


def _save(path, color, size=(20, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_classification(tmp_path):
    root = tmp_path / "pets"
    for name, count in (("golden_retriever", 2), ("tabby_cat", 3), ("empty", 0)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _save(str(root / name / f"{i}.png"), (i * 40, 0, 0))
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    _save(str(root / "tabby_cat" / "nested" / "deep.jpg"), (0, 0, 9))
    ds = image_folder_classification(str(root))
    assert ds.name == "pets" and ds.class_names == ["golden retriever", "tabby cat"], ds.class_names
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert [os.path.relpath(p, root) for p in ds.images] == [
        "golden_retriever/0.png", "golden_retriever/1.png", "tabby_cat/0.png", "tabby_cat/1.png",
        "tabby_cat/2.png", "tabby_cat/nested/deep.jpg"]
    (root / "classnames.txt").write_text("dog\ncat\n")
    assert load_dataset(str(root), "zeroshot").class_names == ["dog", "cat"]
    (root / "classnames.txt").write_text("dog\n")
    with pytest.raises(DatasetError, match="1 class names for 2 class folders"):
        load_dataset(str(root), "zeroshot")
    with pytest.raises(DatasetError, match="no class folders with images"):
        image_folder_classification(str(root / "empty"))


def test_image_folder_retrieval(tmp_path):
    root = tmp_path / "photos"
    for name in ("b.png", "a.png", "sub/c.png"):
        _save(str(root / name), (10, 20, 30))
    lines = [{"image": "b.png", "caption": "first"}, {"image": "a.png", "captions": ["second", "third"]},
             {"image": "b.png", "caption": "fourth"}, {"image": "sub/c.png", "caption": "fifth"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dataset(str(root), "retrieval")
    assert [os.path.relpath(p, root) for p in ds.images] == ["b.png", "a.png", "sub/c.png"]
    assert ds.texts == ["first", "second", "third", "fourth", "fifth"]
    assert ds.text_image_ids.tolist() == [0, 1, 1, 0, 2]
    os.remove(root / "captions.jsonl")
    (root / "captions.tsv").write_text("image\tcaption\nb.png\tone\ta tab\na.png\ttwo\nsub/c.png\tthree\n")
    ds = image_folder_retrieval(str(root))
    assert ds.texts == ["one\ta tab", "two", "three"] and ds.text_image_ids.tolist() == [0, 1, 2]
    (root / "captions.tsv").write_text("b.png\tone\nmissing.png\ttwo\n")
    with pytest.raises(DatasetError, match="1 image.* not found .* first: missing.png"):
        image_folder_retrieval(str(root))
    (root / "captions.tsv").write_text("b.png one\n")
    with pytest.raises(DatasetError, match="line 1: expected IMAGE<TAB>CAPTION"):
        image_folder_retrieval(str(root))
    os.remove(root / "captions.tsv")
    with pytest.raises(DatasetError, match="no captions file"):
        load_dataset(str(root), "retrieval")
    (root / "captions.jsonl").write_text('{"image": "b.png"}\n')
    with pytest.raises(DatasetError, match="line 1: expected"):
        image_folder_retrieval(str(root))


def test_dataset_names_and_checks(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'flickr30k': not a directory"):
        load_dataset("flickr30k", "retrieval")
    with pytest.raises(DatasetError, match="coco_captions is a retrieval dataset, not a zeroshot one"):
        load_dataset("coco_captions", "zeroshot")
    with pytest.raises(DatasetError, match="task must be one of"):
        load_dataset("cifar10", "captioning")
    with pytest.raises(DatasetError, match="image 1 has no caption"):
        RetrievalSet("x", [0, 1], ["a"], [0])
    with pytest.raises(DatasetError, match="label 3 of image 1"):
        ClassificationSet("x", [0, 1], [0, 3], ["a", "b"])


def test_forward_reader_reads_once_and_restarts():
    opened = []

    def stream():
        opened.append(1)
        return iter(range(100, 105))

    reader = datasets_lib.ForwardReader(stream, 5)
    assert [reader[i] for i in (0, 2, 2, 4)] == [100, 102, 102, 104] and len(opened) == 1
    assert reader[1] == 101 and len(opened) == 2, "going back restarts the stream"
    with pytest.raises(IndexError):
        reader[5]


# --- tfds (a stand-in module: tensorflow_datasets is not a dependency) ------------------------------


class _Path:
    def __init__(self, exists):
        self._exists = exists

    def exists(self):
        return self._exists

    def __str__(self):
        return "/data/tfds/fake/1.0.0"


class _FakeTfds:
    """The parts of tensorflow_datasets that datasets.py uses, over in-memory examples."""

    def __init__(self, examples, label_names=None, prepared=True, file_format="array_record"):
        self.examples, self.label_names, self.prepared = examples, label_names, prepared
        self.file_format = file_format
        self.decode = types.SimpleNamespace(SkipDecoding=lambda: "skip")
        self.calls = []

    def builder(self, name, data_dir=None):
        fake = self

        class Builder:
            data_path = _Path(fake.prepared)
            info = types.SimpleNamespace(
                splits={"test": types.SimpleNamespace(num_examples=len(fake.examples))},
                features={"label": types.SimpleNamespace(names=fake.label_names)},
                file_format=types.SimpleNamespace(value=fake.file_format),
            )

            def as_data_source(self, split, decoders):
                fake.calls.append(("source", name, split, decoders, data_dir))
                return list(fake.examples)

            def as_dataset(self, split, shuffle_files, decoders):
                fake.calls.append(("tf.data", name, split, shuffle_files, decoders, data_dir))
                return list(fake.examples)

        return Builder()

    def as_numpy(self, ds):
        return iter(ds)


def _png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_classification_and_retrieval(monkeypatch, file_format):
    examples = [{"image": _png((i, 0, 0)), "label": np.int64(i % 2)} for i in range(3)]
    fake = _FakeTfds(examples, label_names=["apple_pie", "baby_back_ribs"], file_format=file_format)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    # tfrecord datasets are read with tf.data: a stand-in TensorFlow lets that path import.
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    ds = load_dataset("food101", "zeroshot", split="test", data_dir="/data/tfds")
    assert ds.name == "food101:test" and ds.class_names == ["apple pie", "baby back ribs"]
    assert ds.labels.tolist() == [0, 1, 0] and len(ds.images) == 3
    assert [np.asarray(embed_lib.open_image(ds.images[i]))[0, 0, 0] for i in range(3)] == [0, 1, 2], \
        "images come back as the encoded bytes, in order"
    kind = "source" if file_format == "array_record" else "tf.data"
    expected = ("test", {"image": "skip"}, "/data/tfds") if kind == "source" else ("test", False, {"image": "skip"}, "/data/tfds")
    assert all(call[0] == kind and call[2:] == expected for call in fake.calls), fake.calls

    fake.label_names = ["n01440764", "n01443537"]
    with pytest.raises(DatasetError, match="WordNet id"):
        load_dataset("imagenet2012", "zeroshot", split="test")
    ds = load_dataset("imagenet2012", "zeroshot", split="test", class_names=["tench", "goldfish"])
    assert ds.class_names == ["tench", "goldfish"] and len(ds.templates) == 80, "ImageNet uses the 80 CLIP templates"

    captions = [[b"a red square", b"red"], [b"green"], ["blue", "a blue thing", "bleu"]]
    fake.examples = [{"image": _png((0, 0, i)), "captions": {"text": np.asarray(c, object)}} for i, c in enumerate(captions)]
    ds = load_dataset("coco_captions", "retrieval")
    assert ds.name == "coco_captions" and ds.texts == ["a red square", "red", "green", "blue", "a blue thing", "bleu"]
    assert ds.text_image_ids.tolist() == [0, 0, 1, 2, 2, 2]


def test_tfds_errors(monkeypatch, tmp_path):
    # The real tensorflow_datasets (installed for altjax.data) on an empty data_dir.
    with pytest.raises(DatasetError, match=r"'cifar10' is not prepared in .*cifar10.* \(prepare it first, e.g. tfds build cifar10"):
        load_dataset("cifar10", "zeroshot", data_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfds([]))
    with pytest.raises(DatasetError, match="has no split 'train'"):
        load_dataset("cifar10", "zeroshot", split="train")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfds([], file_format="tfrecord"))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # "not installed": the import fails
    with pytest.raises(DatasetError, match="stored as tfrecord, which needs tensorflow"):
        load_dataset("cifar10", "zeroshot")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DatasetError, match="need tensorflow_datasets"):
        load_dataset("cifar10", "zeroshot")


# --- the embedded scenes set ------------------------------------------------------------------------


SMALL_SCENES = dict(image_size=32, num_train=4, num_validation=4, num_test=24)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes"))


def test_scenes(monkeypatch, scenes_dir):
    """The real altjax.data.scenes, at a small size (the adapter passes split, data_dir and lang)."""
    from altjax.data import scenes

    calls = []
    small = scenes.scenes_config(**SMALL_SCENES)

    def load_split(split, **kwargs):
        calls.append((split, kwargs))
        return real(split, config=small, **kwargs)

    real = scenes.load_split
    monkeypatch.setattr(scenes, "load_split", load_split)
    ds = load_dataset("scenes", "retrieval", lang="zh", data_dir=scenes_dir)
    data = real("test", data_dir=scenes_dir, lang="zh", config=small)
    assert ds.name == "scenes" and ds.lang == "zh" and ds.texts == data["captions"] and len(ds.texts) == 24
    assert ds.text_image_ids.tolist() == list(range(24)) and np.array_equal(ds.images, data["images"])
    ds = load_dataset("altjax_scenes", "zeroshot", split="validation", data_dir=scenes_dir)
    assert ds.class_names == scenes.class_names("en") and len(ds.labels) == 4
    assert calls == [("test", dict(data_dir=scenes_dir, lang="zh")),
                     ("validation", dict(data_dir=scenes_dir, lang="en"))], calls


def test_real_tfds_array_record_reader(monkeypatch, scenes_dir):
    """The tfds path against the real tensorflow_datasets, on the scenes set (an ArrayRecord tfds
    dataset) registered for the test as a classification and as a retrieval dataset."""
    import tensorflow_datasets as tfds
    from altjax.data import scenes

    small = scenes.scenes_config(**SMALL_SCENES)
    data = scenes.load_split("test", data_dir=scenes_dir, config=small)
    real_builder = tfds.builder
    monkeypatch.setattr(tfds, "builder", lambda name, **kw: real_builder(name, config=small, **kw))
    # tfds stores the examples shuffled; load_split returns them in generation order ("index").
    source = tfds.builder("altjax_scenes", data_dir=scenes_dir).as_data_source("test")
    order = [int(source[i]["index"]) for i in range(len(source))]
    data = {k: (np.asarray(v)[order] if k != "class_names" else v) for k, v in data.items()}
    data["captions"] = data["captions"].tolist()
    for task, spec in (("zeroshot", datasets_lib.TfdsSpec("zeroshot", "test")),
                       ("retrieval", datasets_lib.TfdsSpec("retrieval", "test", caption_key=("caption_en",)))):
        # load_dataset sends "altjax_scenes" to load_split, so the tfds reader is called directly.
        monkeypatch.setitem(datasets_lib.TFDS_DATASETS, "altjax_scenes", spec)
        ds = datasets_lib._tfds("altjax_scenes", None, "en", scenes_dir, None)
        pixels = np.stack([np.asarray(embed_lib.open_image(ds.images[i]).convert("RGB")) for i in range(len(ds.images))])
        assert np.array_equal(pixels, data["images"]), f"{task}: tfds images differ from load_split's"
        if task == "zeroshot":
            assert ds.labels.tolist() == data["labels"].tolist() and ds.class_names == scenes.class_names("en")
        else:
            assert ds.texts == data["captions"] and ds.text_image_ids.tolist() == list(range(24))


def test_text_length_is_capped_at_what_the_text_tower_takes():
    from altjax import AltCLIPConfig, AltCLIPModel

    model = AltCLIPModel(AltCLIPConfig.from_preset("altclip-tiny"), rngs=nnx.Rngs(0))
    text = model.config.text_config
    limit = text.max_position_embeddings - text.pad_token_id - 1  # XLM-R positions start after the pad id
    processor = types.SimpleNamespace(text_defaults={"max_length": 10_000})
    assert Embedder(model, processor).text_length == limit, "the processor's length was not capped"
    with pytest.raises(ValueError, match=f"text_length {limit + 1} exceeds the {limit} tokens"):
        Embedder(model, processor, text_length=limit + 1)
    align_model = AlignModel(AlignConfig.from_preset("align-tiny"), rngs=nnx.Rngs(0))
    assert Embedder(align_model, processor).text_length == align_model.config.text_config.max_position_embeddings
