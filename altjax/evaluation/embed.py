"""Embedding whole evaluation sets over a device mesh, and the zero-shot / retrieval evaluations.

An :class:`Embedder` turns images or texts into L2-normalised float32 embeddings, ``(N, D)``
NumPy arrays in the input order, identical on every process. The work goes in fixed-size global
batches: each process loads and preprocesses only its rows of a batch (``process_batch_rows``),
the rows become one global array split over the mesh's batch axes (``shard_batch``), and one
jitted function per tower (``nnx.merge`` of the model's state inside ``jax.jit``) embeds it and
returns the batch replicated on every device, so each process reads the whole batch back without a
separate gather. The last batch is padded with copies of the last item, whose embeddings are
dropped: every batch has the same shape, so each tower compiles once.

Unreadable images (a corrupt or truncated file, bytes PIL cannot decode) raise
:class:`UnreadableImageError` (``<file>: cannot read image (<reason>)``) on every process at the
same batch, or, given a :class:`SkippedImages`, are skipped and counted there: their rows are NaN
and the evaluations leave them out (retrieval also leaves out their captions).

``evaluate_zeroshot`` and ``evaluate_retrieval`` are the evaluations of ``eval_results.json``
(DESIGN.md section 3), callable from a training loop every N steps: the jitted functions are
cached on the model's graph definition, so repeated evaluations of a model whose weights change
compile nothing new.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from altjax.console import Progress
from altjax.evaluation.metrics import retrieval_metrics, zeroshot_metrics
from altjax.evaluation.templates import TEMPLATE_SETS, check_templates, fill_template
from altjax.evaluation.zeroshot import zeroshot_classifier
from altjax.sharding import batch_size_divisor, make_mesh, process_batch_rows, shard_batch

DEFAULT_BATCH_SIZE = 256
# Texts are padded to one fixed length so that every batch has the same shape (one compilation)
# and every process tokenises its rows to the same width. CLIP-style models (AltCLIP) are
# evaluated at CLIP's 77-token context; ALIGN's processor has its own default (64).
DEFAULT_TEXT_LENGTH = 77
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class UnreadableImageError(OSError):
    """An image file or encoded image that cannot be read: ``<file>: cannot read image (<reason>)``."""


@dataclasses.dataclass
class SkippedImages:
    """The images :meth:`Embedder.embed_images` skipped as unreadable: their ``indices`` (into
    the images given) and up to ``max_examples`` messages ``<file>: cannot read image (<reason>)``.
    ``as_dict()`` is the ``{"count": n, "examples": [...]}`` that altjax-eval and altjax-embed report."""

    indices: list[int] = dataclasses.field(default_factory=list)
    examples: list[str] = dataclasses.field(default_factory=list)
    max_examples: int = 5

    @property
    def count(self) -> int:
        """How many images were skipped."""
        return len(self.indices)

    def add(self, index: int, message: str) -> None:
        """Records image ``index`` as skipped."""
        self.indices.append(int(index))
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def as_dict(self) -> dict[str, Any]:
        """``{"count": n, "examples": [messages]}`` (JSON-serialisable)."""
        return {"count": self.count, "examples": list(self.examples)}


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def open_image(item: Any, *, name: Optional[str] = None) -> Any:
    """An image item as the processor takes it: a path (str / PathLike) or encoded bytes are
    opened with PIL; PIL images and uint8 arrays pass through.

    Raises :class:`UnreadableImageError` (an OSError), ``<file>: cannot read image (<reason>)``,
    for a path or bytes that do not decode to a whole image (``name`` names the bytes in it).
    """
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
        from PIL import Image

        path = isinstance(item, (str, os.PathLike))
        try:
            with Image.open(item if path else io.BytesIO(bytes(item))) as image:
                image.load()
                return image
        except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
            where = os.fspath(item) if path else (name or "encoded image")
            raise UnreadableImageError(f"{where}: cannot read image ({_reason(e)})") from None
    return item


@functools.partial(jax.jit, static_argnames=("graphdef", "tower", "mesh"))
def _embed_batch(state, batch, *, graphdef, tower: str, mesh: Mesh):
    batch = dict(batch)
    valid = batch.pop("valid", None)  # images: which rows were read (the others are placeholders)
    model = nnx.merge(graphdef, state)
    # Evaluation always runs without dropout and with BatchNorm running statistics, whatever mode
    # the (training) model was in; this only changes the merged copy.
    model.eval()
    if tower == "image":
        features = model.get_image_features(batch["pixel_values"])
    else:
        features = model.get_text_features(**batch)
    features = features.astype(jnp.float32)
    # The same normalisation as the models' image_embeds / text_embeds (no epsilon).
    embeds = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    # Replicated output: every process can read the whole batch from its first local device.
    replicated = NamedSharding(mesh, P())
    if valid is None:
        return jax.lax.with_sharding_constraint(embeds, replicated)
    return jax.lax.with_sharding_constraint(embeds, replicated), jax.lax.with_sharding_constraint(valid, replicated)


def _replicate(x, sharding: NamedSharding):
    """``x`` (a host or single-device value, the same in every process) replicated over the
    sharding's devices, which may span processes (where ``jax.device_put`` cannot go)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # Typed PRNG keys (the dropout streams' state) travel as their raw key data.
        data = _replicate(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place_state(state, mesh: Mesh):
    """Leaves already spread over exactly the mesh's devices (a sharded training state) stay as
    they are; everything else (a model loaded on one device) is replicated over the mesh."""
    devices = set(mesh.devices.flat)
    replicated = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        return _replicate(x, replicated)

    return jax.tree.map(place, state)


def local_mesh(mesh: Mesh) -> Mesh:
    """A data-parallel mesh over this process's devices of ``mesh`` (the whole mesh when there is
    one process). Metrics run on it: every process holds all the embeddings, and a computation on
    its own devices needs no cross-process collectives."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return make_mesh(data=-1, devices=mine)


def max_text_length(model: nnx.Module) -> Optional[int]:
    """The longest token sequence the model's text tower can position-embed (its text config's
    ``max_text_length``; None: no config to tell)."""
    text = getattr(getattr(model, "config", None), "text_config", None)
    return None if text is None else text.max_text_length


class Embedder:
    """Embeds images and texts with a dual encoder over a mesh, in fixed-size global batches.

    Args:
      model: an ``AlignModel``, ``AltCLIPModel`` or ``CLIPModel`` (any NNX module with
        ``get_image_features`` and ``get_text_features``). Its state is split once; later changes
        to ``model`` are not seen.
      processor: the matching processor (``altjax.models.registry``).
      mesh: default ``make_mesh()`` over all devices. The batch is split over its batch axes.
      batch_size: the global batch, rounded up to a multiple of the batch-axis device count and
        capped at the data size (rounded the same way).
      text_length: texts are padded / truncated to this many tokens; default the processor's
        ``max_length`` if it has one (ALIGN: 64), else ``DEFAULT_TEXT_LENGTH`` (77).
      progress: report progress on stderr (process 0 only) for runs of more than one batch.
    """

    def __init__(self, model: nnx.Module, processor: Any, *, mesh: Optional[Mesh] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, text_length: Optional[int] = None,
                 progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.mesh = make_mesh() if mesh is None else mesh
        divisor = batch_size_divisor(self.mesh)
        self.batch_size = -(-batch_size // divisor) * divisor
        self.processor = processor
        defaults = getattr(processor, "text_defaults", {}) or {}
        limit = max_text_length(model)
        if text_length is not None and limit is not None and text_length > limit:
            raise ValueError(f"text_length {text_length} exceeds the {limit} tokens the model's text tower takes")
        self.text_length = int(text_length or defaults.get("max_length") or DEFAULT_TEXT_LENGTH)
        if limit is not None:
            self.text_length = min(self.text_length, limit)
        self.progress = progress
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        self._state = _place_state(state, self.mesh)

    def embed_images(self, images: Sequence[Any], *, what: str = "images",
                     skipped: Optional[SkippedImages] = None) -> np.ndarray:
        """(N, D) float32 normalised image embeddings of ``images``, in order, on every process.

        ``images`` is a sequence (``len`` and indexing) of PIL images, uint8 (H, W[, C]) arrays,
        image file paths or encoded image bytes, or a uint8 (N, H, W, C) array. Items are read
        in increasing index order, each process only its own rows.

        An image that cannot be read raises :class:`UnreadableImageError` on every process (at the
        batch after the one holding it, ``<file>: cannot read image (<reason>)``), unless
        ``skipped`` is given: then it is recorded there and its row is NaN.
        """
        errors: dict[int, str] = {}  # this process's unreadable images

        def describe(i: int) -> str:
            item = images[i] if isinstance(images, (list, tuple)) else None
            return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"{what}[{i}]"

        def load(indices):
            opened, valid = [], []
            for i in map(int, indices):
                try:
                    opened.append(open_image(images[i], name=f"{what}[{i}]"))
                    valid.append(True)
                except UnreadableImageError as e:
                    errors[i] = str(e)
                    opened.append(_placeholder_image())  # embedded like any image, then dropped
                    valid.append(False)
            pixels = self.processor(images=opened)["pixel_values"]
            return {"pixel_values": np.asarray(pixels, np.float32), "valid": np.asarray(valid)}

        def message(i: int) -> str:
            return errors.get(i) or f"{describe(i)}: cannot read image (read by another process)"

        def fail(i: int):
            raise UnreadableImageError(message(i))

        out, valid = self._embed("image", len(images), load, what, fail=None if skipped is not None else fail)
        for i in np.flatnonzero(~valid):
            skipped.add(int(i), message(int(i)))
            out[i] = np.nan
        return out

    def embed_texts(self, texts: Sequence[str], *, what: str = "texts") -> np.ndarray:
        """(N, D) float32 normalised text embeddings of ``texts``, in order, on every process."""

        def load(indices):
            encoded = self.processor(text=[texts[int(i)] for i in indices], padding="max_length",
                                     truncation=True, max_length=self.text_length, return_tensors="np")
            return {k: np.asarray(encoded[k], np.int32) for k in TEXT_INPUTS if k in encoded}

        return self._embed("text", len(texts), load, what)[0]

    def _embed(self, tower: str, n: int, load: Callable[[np.ndarray], dict], what: str,
               fail: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
        """The (n, D) embeddings and which rows were valid (read), in order. ``fail(i)`` is called
        (on every process alike) with the first invalid row of a batch, when given."""
        if n == 0:
            raise ValueError(f"no {what} to embed")
        divisor = batch_size_divisor(self.mesh)
        batch = min(self.batch_size, -(-n // divisor) * divisor)
        rows = process_batch_rows(self.mesh, batch)
        fn = functools.partial(_embed_batch, graphdef=self._graphdef, tower=tower, mesh=self.mesh)
        out: Optional[np.ndarray] = None
        valid = np.ones(n, bool)
        pending = None

        def collect(start, result):
            nonlocal out
            count = min(batch, n - start)
            if isinstance(result, tuple):
                result, read = result
                valid[start:start + count] = np.asarray(read.addressable_data(0))[:count]
                if fail is not None and not valid[start:start + count].all():
                    fail(start + int(np.argmin(valid[start:start + count])))
            result = np.asarray(result.addressable_data(0))
            if out is None:
                out = np.empty((n, result.shape[1]), np.float32)
            out[start:start + count] = result[:count]
            progress.update(count)

        # Only runs of several batches report progress. Leaving the block ends the bar's line, so
        # an error from fail() is printed on a line of its own.
        with Progress(n, f"embedding {what}", unit=what, enabled=self.progress and n > batch) as progress:
            for start in range(0, n, batch):
                # Rows past the end repeat the last item: valid inputs whose outputs are dropped.
                indices = np.minimum(np.arange(start + rows.start, start + rows.stop), n - 1)
                result = fn(self._state, shard_batch(load(indices), self.mesh))
                # The device works on this batch while the host loads the next one.
                if pending is not None:
                    collect(*pending)
                pending = (start, result)
            collect(*pending)
        return out, valid


def _placeholder_image():
    from PIL import Image

    return Image.new("RGB", (32, 32))


def default_templates(lang: str) -> tuple[str, ...]:
    """The built-in template set for a language (``"en"``, ``"zh"``)."""
    if lang not in ("en", "zh"):
        raise ValueError(f"no built-in templates for language {lang!r}; pass templates (a list or file)")
    return TEMPLATE_SETS[lang]


def build_classifier(embedder: Embedder, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """The (C, D) zero-shot classifier: every distinct prompt embedded once in batches, then
    ``zeroshot_classifier`` (per-class mean of normalised prompt embeddings, renormalised)."""
    templates = check_templates(templates)
    prompts = list(dict.fromkeys(fill_template(t, c) for c in class_names for t in templates))
    embeds = embedder.embed_texts(prompts, what="prompts")
    row = {p: i for i, p in enumerate(prompts)}
    return np.asarray(zeroshot_classifier(lambda ps: embeds[[row[p] for p in ps]], class_names, templates))


def _embedder(model, processor, mesh, batch_size, text_length, progress) -> Embedder:
    return Embedder(model, processor, mesh=mesh, batch_size=batch_size, text_length=text_length,
                    progress=progress)


def _readable(dataset, skipped: Optional[SkippedImages]) -> np.ndarray:
    """Which images of ``dataset`` were read; ValueError when none was."""
    keep = np.ones(len(dataset.images), bool)
    if skipped is not None and skipped.count:
        keep[skipped.indices] = False
        if not keep.any():
            raise ValueError(f"{dataset.name}: none of its {keep.size} images could be read "
                             f"(the first: {skipped.examples[0]})")
    return keep


def evaluate_zeroshot(model: nnx.Module, processor: Any, dataset, *, templates: Optional[Sequence[str]] = None,
                      mesh: Optional[Mesh] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                      text_length: Optional[int] = None, progress: bool = False,
                      skipped: Optional[SkippedImages] = None) -> dict[str, float]:
    """Zero-shot classification of ``dataset`` (a ``ClassificationSet``): ``top1``, ``top5``,
    ``mean_per_class_recall`` in percent.

    ``templates`` default to the dataset's own (ImageNet: the 80 CLIP prompts), else the built-in
    set for the dataset's language. An unreadable image raises :class:`UnreadableImageError`,
    unless ``skipped`` is given: then it is recorded there and left out of the metrics. Other
    arguments: see :class:`Embedder`.
    """
    embedder = _embedder(model, processor, mesh, batch_size, text_length, progress)
    if templates is None:
        templates = dataset.templates or default_templates(dataset.lang)
    classifier = build_classifier(embedder, dataset.class_names, templates)
    image_embeds = embedder.embed_images(dataset.images, skipped=skipped)
    keep = _readable(dataset, skipped)
    return zeroshot_metrics(image_embeds[keep], classifier, dataset.labels[keep], mesh=local_mesh(embedder.mesh))


def evaluate_retrieval(model: nnx.Module, processor: Any, dataset, *, mesh: Optional[Mesh] = None,
                       batch_size: int = DEFAULT_BATCH_SIZE, text_length: Optional[int] = None,
                       progress: bool = False, skipped: Optional[SkippedImages] = None) -> dict[str, float]:
    """Image-text retrieval on ``dataset`` (a ``RetrievalSet``): R@1/5/10 both ways and their
    mean ``mr``, in percent (``retrieval_metrics``). An unreadable image raises
    :class:`UnreadableImageError`, unless ``skipped`` is given: then it is recorded there and it
    and its captions are left out of the metrics. Other arguments: see :class:`Embedder`."""
    embedder = _embedder(model, processor, mesh, batch_size, text_length, progress)
    image_embeds = embedder.embed_images(dataset.images, skipped=skipped)
    keep = _readable(dataset, skipped)
    ids = np.asarray(dataset.text_image_ids)
    texts = keep[ids]
    new_ids = np.cumsum(keep) - 1  # old image index -> index among the images kept
    text_embeds = embedder.embed_texts([t for t, k in zip(dataset.texts, texts) if k])
    return retrieval_metrics(image_embeds[keep], text_embeds, new_ids[ids[texts]], mesh=local_mesh(embedder.mesh))


def evaluated_counts(dataset, skipped: Optional[SkippedImages] = None) -> dict[str, int]:
    """What an evaluation of ``dataset`` counted, shown beside its metrics: the ``images`` read
    (all but those in ``skipped``), and the ``classes`` of a ``ClassificationSet`` or the
    ``texts`` of a ``RetrievalSet`` (the captions of the images read)."""
    keep = _readable(dataset, skipped)
    if hasattr(dataset, "class_names"):
        return {"images": int(keep.sum()), "classes": len(dataset.class_names)}
    return {"images": int(keep.sum()), "texts": int(keep[np.asarray(dataset.text_image_ids)].sum())}


def evaluation_key(task: str, dataset: str, lang: str) -> str:
    """The ``eval_results.json`` name of an evaluation: ``"<task>/<dataset>/<lang>"``."""
    if task not in ("zeroshot", "retrieval"):
        raise ValueError(f"task must be 'zeroshot' or 'retrieval', got {task!r}")
    return f"{task}/{dataset}/{lang}"
