"""Parity check: one batch through transformers (PyTorch) and altjax, compared output by output.

Used by ``altjax-convert --check`` to prove a conversion changed nothing. Needs torch and
transformers (the reference); nothing else in ``altjax.model_io`` does. The caller names the model's
processor class and transformers class (``altjax.models.registry``); nothing here knows a model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from altjax.model_io.directories import CheckpointError
from altjax.processing import IMAGE_CONFIG_NAME, PROCESSOR_CONFIG_NAME, image_settings

# The outputs compared: both normalised embeddings and the image-text logits.
OUTPUTS = ("image_embeds", "text_embeds", "logits_per_image")
# float32 on CPU agrees to ~1e-6; the default leaves room for a different BLAS or device.
DEFAULT_TOLERANCE = 1e-4
DEFAULT_TEXTS = ("a photo of a cat", "a diagram of two red squares", "un chien qui court sur la plage")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One output: the largest absolute difference, that difference relative to the largest
    reference magnitude, and the lowest row-wise cosine similarity."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    min_cosine: float
    tolerance: float
    nonfinite: str = ""  # which side has NaN or inf values, if any

    @property
    def passed(self) -> bool:
        # Embeddings are unit vectors, so absolute and relative coincide; logits are scaled by
        # 1 / temperature (about 50 for ALIGN), so they are judged relative to their magnitude.
        return not self.nonfinite and bool(self.max_rel <= self.tolerance)


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], *,
            tolerance: float = DEFAULT_TOLERANCE) -> list[Comparison]:
    rows = []
    for name in OUTPUTS:
        a, b = np.asarray(ours[name], np.float64), np.asarray(reference[name], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name}: altjax gives shape {a.shape}, transformers {b.shape}")
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12)
        cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
        nonfinite = " and ".join(side for side, x in (("altjax", a), ("transformers", b)) if not np.all(np.isfinite(x)))
        rows.append(Comparison(name, a.shape, diff, diff / scale, float(np.min(cos)), tolerance, nonfinite))
    return rows


def format_table(rows: Sequence[Comparison]) -> str:
    header = f"{'output':<18} {'shape':<10} {'max abs diff':>13} {'max rel diff':>13} {'min cosine':>12}  result"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        verdict = ("ok" if r.passed else f"FAIL ({r.nonfinite} not finite)" if r.nonfinite
                   else f"FAIL (> {r.tolerance:g})")
        lines.append(f"{r.name:<18} {shape:<10} {r.max_abs:>13.3e} {r.max_rel:>13.3e} {r.min_cosine:>12.9f}  {verdict}")
    return "\n".join(lines)


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the image ({e})") from None
    return images


def has_processor(processor_dir: Optional[str]) -> bool:
    """Whether ``processor_dir`` holds image-processor settings (``processor_config.json`` with an
    ``image_processor`` entry, as transformers 5 writes, or ``preprocessor_config.json``): the
    files that make it a processor's directory, with its tokenizer."""
    return processor_dir is not None and os.path.isdir(processor_dir) and image_settings(processor_dir) is not None


def describe_inputs(processor_class: type, processor_dir: Optional[str], *, images: Sequence[str] = (),
                    texts: Sequence[str] = (), batch: int = 3) -> str:
    """What :func:`check_inputs` feeds the models, in words, for the user to see."""
    if not has_processor(processor_dir):
        return (f"random token ids and normal noise as pixel values ({batch} pairs; {processor_dir} holds neither "
                f"{PROCESSOR_CONFIG_NAME} nor {IMAGE_CONFIG_NAME})")
    shown_images = f"{len(images)} of your images" if images else f"{batch} synthetic images"
    shown_texts = f"{len(texts)} of your texts" if texts else f"{len(DEFAULT_TEXTS)} fixed captions"
    return f"{shown_images} and {shown_texts} through the directory's {processor_class.__name__} ({processor_dir})"


def check_inputs(config: Any, processor_class: type, processor_dir: Optional[str], *, images: Sequence[str] = (),
                 texts: Sequence[str] = (), batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch to compare on: NHWC ``pixel_values`` and token ids (+ masks).

    With a processor in ``processor_dir`` (a tokenizer and image settings, :func:`has_processor`;
    loaded with ``processor_class.from_pretrained``), the user's ``images`` (paths) and ``texts``
    go through it, defaulting to synthetic images and a few fixed captions; without one, the batch
    is synthetic: normal pixel values at the model's image size and random token ids with ragged
    padding.
    """
    rng = np.random.default_rng(seed)
    vision, text = config.vision_config, config.text_config
    if has_processor(processor_dir):
        processor = processor_class.from_pretrained(processor_dir)
        pil = _load_images(images) if images else [
            rng.integers(0, 256, (vision.image_size + 7 * i, vision.image_size + 5, 3), dtype=np.uint8) for i in range(batch)]
        inputs = dict(processor(text=list(texts or DEFAULT_TEXTS), images=pil, padding=True, return_tensors="np"))
        if inputs["input_ids"].max() >= text.vocab_size:
            raise CheckpointError(f"{processor_dir}: the tokenizer gives token id {int(inputs['input_ids'].max())}, "
                                  f"beyond the model's vocab_size {text.vocab_size}")
        return inputs
    if images or texts:
        raise CheckpointError(f"{processor_dir}: --images/--texts need a processor (a tokenizer and "
                              f"{PROCESSOR_CONFIG_NAME} or {IMAGE_CONFIG_NAME}) in the source directory")
    length = min(16, text.max_position_embeddings - 4)
    pad = text.pad_token_id if text.pad_token_id is not None else 0
    # Ids of no special token: BERT's and XLM-R's are among the first four, CLIP's are its last ids.
    special = [t for t in (text.pad_token_id, text.bos_token_id, text.eos_token_id) if t is not None]
    words = np.setdiff1d(np.arange(4, text.vocab_size), special)
    ids = words[rng.integers(0, len(words), (batch, length))]
    lengths = np.linspace(length, max(2, length // 3), batch).astype(int)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    return dict(
        input_ids=np.where(mask == 1, ids, pad).astype(np.int64),
        attention_mask=mask,
        pixel_values=rng.normal(size=(batch, vision.image_size, vision.image_size, vision.num_channels)).astype(np.float32),
    )


def run_altjax(model: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax

    model.eval()
    # Full float32 matmuls: on GPUs and TPUs the default precision would be the difference measured.
    with jax.default_matmul_precision("highest"):
        out = model(**inputs)
    return {name: np.asarray(getattr(out, name)) for name in OUTPUTS}


def run_transformers(hf_dir: str, transformers_class: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Loads ``hf_dir`` with ``transformers.<transformers_class>`` (missing or unexpected keys are
    an error) and runs it."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise CheckpointError(f"--check needs torch and transformers, the reference ({e}); "
                              "install them (pip install 'altjax[test]') or convert without --check") from None
    cls = getattr(transformers, transformers_class)
    model, info = cls.from_pretrained(hf_dir, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise CheckpointError(f"{hf_dir}: transformers reports {problems}")
    model.eval()
    feed = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items() if k != "pixel_values"}
    feed["pixel_values"] = torch.from_numpy(np.ascontiguousarray(inputs["pixel_values"].transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(**feed)
    return {name: getattr(out, name).float().numpy() for name in OUTPUTS}
