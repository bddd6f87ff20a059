"""CLIP contrastive training (``config.task = "clip"``): a ``CLIPModel`` (ViT + CLIP text) on
images with captions, CLIP's softmax loss with the learned ``logit_scale`` (or SigLIP's sigmoid
loss); e.g. the tiny teacher of the AltCLIP demo.

Its config: ``model`` (``preset`` with ``text``/``vision`` fields replaced, or ``init_from`` a CLIP
directory), ``data`` (captions in several languages, one drawn per example and epoch: the scenes
captions of ``langs``, or one field per language in ``caption_keys``; ``tokenizer`` "scenes-clip",
"scenes-xlmr" or a directory), ``loss`` (:func:`altjax.training.objectives.contrastive`). AltCLIP's
phase 2 (:mod:`altjax.training.tasks.altclip`) trains with the same pipeline and objective.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from altjax import sharding
from altjax.data import parallel
from altjax.data.builders import multilingual_source
from altjax.data.pipeline import InputPipeline
from altjax.data.preprocess import ImageTransform, TextField, clip_image_config
from altjax.data.tokenizers import scenes_clip_tokenizer, scenes_xlmr_tokenizer
from altjax.models import clip
from altjax.processing import AltCLIPProcessor
from altjax.training import checks, objectives
from altjax.training.tasks.base import Task

# Tokenizers altjax builds from the scenes captions; anything else names a directory.
BUILT_TOKENIZERS = ("scenes-clip", "scenes-xlmr")


def check_image_text(c: checks.Checker) -> None:
    """The data and loss of a CLIP-style contrastive run (this task, AltCLIP phase 2)."""
    source = checks.check_source(c)
    checks.check_image_input(c)
    checks.check_tokenizer(c, "data.tokenizer", BUILT_TOKENIZERS)
    if source == "scenes":
        langs = c.require("data.langs")
        bad = [lang for lang in langs or () if lang not in checks.SCENES_LANGS]
        if not langs or bad:
            c.fail("data.langs", f"expected languages among {checks.SCENES_LANGS}, got {tuple(langs or ())!r}")
    elif source is not None and not c.require("data.caption_keys"):
        c.fail("data.caption_keys", f"empty; data.source {source!r} needs the caption field of each language, "
               "e.g. ('en.txt', 'zh.txt')")
    checks.check_contrastive_loss(c)


def check(c: checks.Checker) -> None:
    checks.check_model(c, model_type=clip.MODEL_TYPE, presets=clip.PRESETS, config_class=clip.CLIPConfig)
    check_image_text(c)


def load_tokenizer(name: str, directory: str, key: str):
    """``"scenes-clip"``, ``"scenes-xlmr"`` (written to ``directory``) or a tokenizer directory
    (``key``: the config entry that names it, for the error)."""
    if name == "scenes-clip":
        return scenes_clip_tokenizer(directory)
    if name == "scenes-xlmr":
        return scenes_xlmr_tokenizer(directory)
    return checks.pretrained_tokenizer(name, key)


def processor_for(tokenizer, image_size: int, directory: str, max_length: int) -> AltCLIPProcessor:
    """An AltCLIPProcessor (CLIP image preprocessing at ``image_size``) saved to ``directory`` and
    loaded back; texts are padded to ``max_length`` by default (as the evaluation needs)."""
    tokenizer.init_kwargs["max_length"] = int(max_length)
    AltCLIPProcessor(tokenizer, clip_image_config(int(image_size))).save_pretrained(directory)
    return AltCLIPProcessor.from_pretrained(directory)


def build_processor(config, directory: str) -> AltCLIPProcessor:
    """The run's processor: ``config.data.tokenizer`` (empty: ``config.model.init_from``'s) with CLIP's
    image preprocessing at the model's image size, saved in ``directory``."""
    data = config.data
    tokenizer = load_tokenizer(data.tokenizer or config.model.init_from, os.path.join(directory, ".tokenizer"),
                               "data.tokenizer" if data.tokenizer else "model.init_from")
    return processor_for(tokenizer, int(config.model.vision.image_size), directory, int(data.max_length))


def tower_overrides(fields) -> dict[str, Any]:
    """A config's ``model.text`` / ``model.vision`` as dataclass fields (lists become tuples)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(fields).items()}


def model_config(config, vocab_size: int) -> clip.CLIPConfig:
    """``config.model`` as a CLIPConfig: the preset with ``text``/``vision`` overrides
    (``text.vocab_size`` -1: the tokenizer's, at least the preset's)."""
    base = clip.CLIPConfig.from_preset(config.model.preset)
    text = tower_overrides(config.model.text)
    if text["vocab_size"] == -1:
        text["vocab_size"] = max(vocab_size, base.text_config.vocab_size)
    return dataclasses.replace(
        base, text_config=dataclasses.replace(base.text_config, **text),
        vision_config=dataclasses.replace(base.vision_config, **tower_overrides(config.model.vision)),
        projection_dim=int(config.model.projection_dim))


def build(config, directory: str, mesh):
    processor = build_processor(config, directory)
    dtype, seed = jnp.dtype(config.model.dtype), int(config.seed)
    if config.model.init_from:
        return clip.CLIPModel.from_pretrained(config.model.init_from, dtype=dtype, seed=seed, mesh=mesh), processor
    model_cfg = model_config(config, len(processor.tokenizer))
    return sharding.sharded_init(lambda rngs: clip.CLIPModel(model_cfg, dtype=dtype, rngs=rngs), mesh,
                                 seed=seed), processor


def pipeline(config, processor, directory: str, rows) -> InputPipeline:
    """This process's ``rows`` of every global batch: images with one of their captions (one field
    per language, drawn per example and epoch), deterministic and resumable."""
    del directory
    data = config.data
    source = parallel.MultilingualCaptions(*multilingual_source(data))
    image = ImageTransform(clip_image_config(int(config.model.vision.image_size)), data.augment or None)
    return InputPipeline(source, batch_size=int(config.batch_size), rows=rows, image=image,
                         texts=TextField(processor.tokenizer, max_length=int(data.max_length)), seed=int(config.seed),
                         num_threads=data.num_threads or None, prefetch=int(data.prefetch))


def objective(config) -> objectives.Objective:
    """CLIP's (and AltCLIP phase 2's) loss: the contrastive loss with logits scaled by
    ``exp(logit_scale)``; text features from ``input_ids`` and ``attention_mask``."""
    loss = config.loss
    return objectives.contrastive(
        lambda m, b: m.get_image_features(b["pixel_values"]),
        lambda m, b: m.get_text_features(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")),
        lambda m: jnp.exp(m.logit_scale[...]), kind=loss.kind, label_smoothing=float(loss.label_smoothing),
        learn_temperature=bool(loss.learn_temperature), learn_bias=bool(loss.learn_bias), impl=loss.impl)


TASK = Task("clip", check=check, build=build, pipeline=pipeline, objective=objective)
