"""ALIGN contrastive training (``config.task = "align"``): an ``AlignModel`` (EfficientNet + BERT)
on image-text pairs, softmax contrastive loss with label smoothing and a learned temperature
(or SigLIP's sigmoid loss), as in the ALIGN paper; ``configs/align_base.py`` and ``configs/demo.py``.

Its config: ``model`` (``preset`` with ``text``/``vision`` fields replaced, or ``init_from`` an ALIGN
directory), ``data`` (one caption field: ``caption_key``, or the scenes captions in ``lang``;
``tokenizer`` "scenes" or a directory), ``loss`` (:func:`altjax.training.objectives.contrastive`).
"""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from altjax import sharding
from altjax.data.builders import source_from_config
from altjax.data.pipeline import InputPipeline
from altjax.data.preprocess import ImageTransform, TextField, align_image_config
from altjax.data.tokenizers import scenes_word_tokenizer
from altjax.models import align
from altjax.processing import AlignProcessor
from altjax.training import checks, objectives
from altjax.training.tasks.base import Task

BUILT_TOKENIZERS = ("scenes",)


def check(c: checks.Checker) -> None:
    checks.check_model(c, model_type=align.MODEL_TYPE, presets=align.PRESETS, config_class=align.AlignConfig)
    c.number("model.temperature_init_value", low=0.0, low_open=True)
    source = checks.check_source(c)
    checks.check_image_input(c)
    tokenizer = checks.check_tokenizer(c, "data.tokenizer", BUILT_TOKENIZERS)
    lang = c.string("data.lang")
    if source == "scenes":
        c.choice("data.lang", checks.SCENES_LANGS)
    if tokenizer == "scenes" and lang not in (None, "en"):
        c.fail("data.tokenizer", f"'scenes' is an English tokenizer, data.lang is {lang!r}; give a tokenizer directory")
    checks.check_contrastive_loss(c)


def build_processor(config, directory: str) -> AlignProcessor:
    """The AlignProcessor of a run, saved to ``directory``: the tokenizer (``config.data.tokenizer``:
    ``"scenes"`` or a tokenizer directory; empty: the one of ``config.model.init_from``) with texts
    padded to ``config.data.max_length`` by default, and ALIGN's evaluation image preprocessing at
    the model's image size."""
    data = config.data
    if data.tokenizer == "scenes":
        tokenizer = scenes_word_tokenizer(os.path.join(directory, ".vocab"), data.lang)
    else:
        tokenizer = checks.pretrained_tokenizer(data.tokenizer or config.model.init_from,
                                                "data.tokenizer" if data.tokenizer else "model.init_from")
    # Saved with the tokenizer so that AlignProcessor (and altjax-eval) pads to this length.
    tokenizer.init_kwargs["max_length"] = int(data.max_length)
    processor = AlignProcessor(tokenizer, align_image_config(int(config.model.vision.image_size)))
    processor.save_pretrained(directory)
    return AlignProcessor.from_pretrained(directory)


def model_config(config, vocab_size: int) -> align.AlignConfig:
    """The AlignConfig of ``config.model``: a preset with the ``text``/``vision`` fields and the
    top-level fields replaced (``text.vocab_size`` -1 takes the tokenizer's size)."""
    base = align.AlignConfig.from_preset(config.model.preset)
    text = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.text.items()}
    if text["vocab_size"] == -1:
        text["vocab_size"] = vocab_size
    vision = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.vision.items()}
    return dataclasses.replace(
        base, text_config=dataclasses.replace(base.text_config, **text),
        vision_config=dataclasses.replace(base.vision_config, **vision),
        projection_dim=int(config.model.projection_dim),
        temperature_init_value=float(config.model.temperature_init_value))


def build(config, directory: str, mesh):
    processor = build_processor(config, directory)
    dtype = jnp.dtype(config.model.dtype)
    if config.model.init_from:
        model = align.AlignModel.from_pretrained(config.model.init_from, dtype=dtype, seed=int(config.seed), mesh=mesh)
    else:
        model_cfg = model_config(config, len(processor.tokenizer))
        model = sharding.sharded_init(lambda rngs: align.AlignModel(model_cfg, dtype=dtype, rngs=rngs), mesh,
                                      seed=int(config.seed))
    return model, processor


def pipeline(config, processor, directory: str, rows) -> InputPipeline:
    """This process's ``rows`` of every global batch of images with their captions, deterministic and resumable."""
    del directory
    data = config.data
    image = ImageTransform(align_image_config(int(config.model.vision.image_size)), data.augment or None)
    return InputPipeline(source_from_config(data, data.split, data.caption_key, data.lang),
                         batch_size=int(config.batch_size), rows=rows, image=image,
                         texts=TextField(processor.tokenizer, max_length=int(data.max_length)), seed=int(config.seed),
                         num_threads=data.num_threads or None, prefetch=int(data.prefetch))


def objective(config) -> objectives.Objective:
    """ALIGN's loss: the contrastive loss with logits divided by the learned ``temperature``, label
    smoothing (ALIGN: 0.1); text features from ``input_ids``, ``attention_mask`` and ``token_type_ids``."""
    loss = config.loss
    return objectives.contrastive(
        lambda m, b: m.get_image_features(b["pixel_values"]),
        lambda m, b: m.get_text_features(b["input_ids"], b.get("attention_mask"), b.get("token_type_ids")),
        lambda m: 1.0 / m.temperature[...], kind=loss.kind, label_smoothing=float(loss.label_smoothing),
        learn_temperature=bool(loss.learn_temperature), learn_bias=bool(loss.learn_bias), impl=loss.impl)


TASK = Task("align", check=check, build=build, pipeline=pipeline, objective=objective)
