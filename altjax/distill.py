"""AltCLIP's two training phases (and plain CLIP training) in the altjax trainer.

``config.model.kind`` picks what ``altjax-train`` builds (``"align"``, the default, is
:mod:`altjax.train`'s own):

``"clip"``     a ``CLIPModel`` (e.g. the tiny teacher of the miniature), ``config.loss.name = "clip"``.
``"altclip"``  an ``AltCLIPModel``; phase 2, ``config.loss.name = "clip"``: image-text contrastive
               learning in both languages, image tower frozen (``freeze``), text side trained.
``"distill"``  phase 1, ``config.loss.name = "distill"``: a :class:`DistillModel` holding the
               student ``AltCLIPModel`` and the frozen teacher ``CLIPTextTeacher``; MSE between
               the teacher's embedding of sentence A and the student's of sentence B over parallel
               pairs, identical-language pairs included (:mod:`altjax.data.parallel`).

What the student regresses onto (``config.distill.target``):

``"pooled"`` (default): the teacher's EOS output *before* ``text_projection`` (CLIP text width),
  matched by the student's transformed [CLS] (``pooler_output``, width ``project_dim``). This is
  how transformers documents ``project_dim`` ("dimensions of the teacher model before the mapping
  layer"), and AltCLIP's ``text_projection`` is then CLIP's own, copied from the teacher: the
  student's text features land in CLIP's image-text space from the start of phase 2.
``"projected"``: the teacher's projected embedding (``get_text_features``), width
  ``projection_dim`` = ``project_dim``; the student's ``text_projection`` is set to the identity.

Either way the student's ``vision_model``, ``visual_projection`` and ``logit_scale`` are the
teacher CLIP's (AltCLIP keeps CLIP's image tower), and in phase 1 nothing but the student's text
tower trains (its recipe freezes the rest, see ``configs/altclip_distill.py``).

Tokenizers: ``config.data.tokenizer`` (student / the model's) and ``config.distill.teacher_tokenizer``
name a tokenizer directory, or build one from the scenes captions: ``"scenes-clip"`` (a word-level
English tokenizer laid out like CLIP's, for the ``clip-tiny`` preset: Chinese is unknown to it) and
``"scenes-xlmr"`` (an XLM-R Unigram tokenizer covering the English words and the Chinese characters).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax import config_checks
from altjax.models import layers
from altjax.models.altclip import AltCLIPConfig, AltCLIPModel
from altjax.models.clip import CLIPConfig, CLIPModel
from altjax.models.clip_text import CLIPTextTeacher
from altjax.train_step import Objective, contrastive_objective, normalised

KINDS = ("clip", "altclip", "distill")
TARGETS = ("pooled", "projected")
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"
# The parameters that do not train in phase 1: the teacher and everything of the student that is
# not its text tower (text_projection is not in the phase-1 loss; weight decay alone would shrink it).
PHASE1_FREEZE = r"^teacher/|^student/(vision_model|visual_projection|text_projection|logit_scale)"
# Phase 2: AltCLIP's image tower stays CLIP's.
PHASE2_FREEZE = r"^vision_model|^visual_projection"


# ----- tokenizers -----

def scenes_clip_tokenizer(directory: str, *, vocab_size: int = 1024):
    """A word-level English tokenizer of the scenes captions laid out like CLIP's (the
    ``clip-tiny`` preset): words first, ``<|startoftext|>`` = ``vocab_size - 2``,
    ``<|endoftext|>`` = ``vocab_size - 1`` (which also pads), lower-cased, punctuation split off.
    Chinese characters get ids of their own after the words, one per character, as CLIP's
    byte-level BPE gives any text tokens: trained on English captions only, the teacher never
    learns them, so it reads Chinese at about chance (mapping them all to ``<unk>`` would instead
    make every Chinese caption the same text, and retrieval ties)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from altjax.data import scenes

    words = sorted({w.lower() for w in scenes.vocabulary("en")})
    chars = sorted(set(scenes.vocabulary("zh")) - {" "})
    vocab = {w: i for i, w in enumerate(words + ["<unk>"] + chars)}
    bos, eos = vocab_size - 2, vocab_size - 1
    if len(vocab) > bos:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(directory)
    return tokenizer


def scenes_xlmr_tokenizer(directory: str):
    """An XLM-R (sentencepiece Unigram) tokenizer whose pieces are the scenes captions' English
    words (``▁word``) and Chinese characters (alone and as ``▁char``), with XLM-R's special tokens
    ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3: no caption of either language has an unknown piece."""
    import transformers

    from altjax.data import scenes

    words = sorted({w.lower() for w in scenes.vocabulary("en")})
    chars = sorted(set(scenes.vocabulary("zh")) - {" "})
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0), ("▁", -8.0)]
    # Sentencepiece does not lower-case: a capitalised piece per word for sentence starts.
    vocab += [("▁" + v, -2.0) for w in words if w.isalnum() for v in dict.fromkeys((w, w.capitalize()))]
    vocab += [(w, -3.0) for w in words if not w.isalnum()]
    vocab += [(c, -4.0) for c in chars] + [("▁" + c, -4.5) for c in chars]
    tokenizer = transformers.XLMRobertaTokenizer(vocab=vocab, model_max_length=512)
    tokenizer.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def load_tokenizer(name: str, directory: str, key: str = "data.tokenizer"):
    """``"scenes-clip"``, ``"scenes-xlmr"`` (written to ``directory``) or a tokenizer directory
    (``key``: the config entry that names it, for the error)."""
    if name == "scenes-clip":
        return scenes_clip_tokenizer(directory)
    if name == "scenes-xlmr":
        return scenes_xlmr_tokenizer(directory)
    if not name:
        raise ValueError("no tokenizer: give 'scenes-clip', 'scenes-xlmr' or a tokenizer directory")
    return config_checks.pretrained_tokenizer(name, key)


def processor_for(tokenizer, image_size: int, directory: str, max_length: int):
    """An AltCLIPProcessor (CLIP image preprocessing at ``image_size``) saved to ``directory`` and
    loaded back; texts are padded to ``max_length`` by default (as the evaluation needs)."""
    from altjax.data.preprocess import clip_image_config
    from altjax.processing import AltCLIPProcessor

    tokenizer.init_kwargs["max_length"] = int(max_length)
    AltCLIPProcessor(tokenizer, clip_image_config(int(image_size))).save_pretrained(directory)
    return AltCLIPProcessor.from_pretrained(directory)


# ----- models -----

class DistillModel(nnx.Module):
    """Phase 1's pair: ``student`` (an ``AltCLIPModel``, whose text tower learns) and ``teacher``
    (a ``CLIPTextTeacher``, frozen). The step's parameter paths start with ``student/`` or ``teacher/``."""

    def __init__(self, student: AltCLIPModel, teacher: CLIPTextTeacher):
        self.student = student
        self.teacher = teacher


def _overrides(d) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(d).items()}


def clip_config(config, vocab_size: int) -> CLIPConfig:
    """``config.model`` as a CLIPConfig: the preset with ``text``/``vision`` overrides (``text.vocab_size`` -1: the tokenizer's)."""
    base = CLIPConfig.from_preset(config.model.preset)
    text = _overrides(config.model.get("text", {}))
    if text.get("vocab_size", -1) == -1:
        text["vocab_size"] = max(vocab_size, base.text_config.vocab_size)
    return dataclasses.replace(
        base, text_config=dataclasses.replace(base.text_config, **text),
        vision_config=dataclasses.replace(base.vision_config, **_overrides(config.model.get("vision", {}))),
        projection_dim=int(config.model.get("projection_dim", base.projection_dim)))


def altclip_config(config, vocab_size: int) -> AltCLIPConfig:
    """``config.model`` as an AltCLIPConfig (as :func:`clip_config`)."""
    base = AltCLIPConfig.from_preset(config.model.preset)
    text = _overrides(config.model.get("text", {}))
    if text.get("vocab_size", -1) == -1:
        text["vocab_size"] = vocab_size
    return dataclasses.replace(
        base, text_config=dataclasses.replace(base.text_config, **text),
        vision_config=dataclasses.replace(base.vision_config, **_overrides(config.model.get("vision", {}))),
        projection_dim=int(config.model.get("projection_dim", base.projection_dim)))


def _assign(dst: nnx.Module, src: nnx.Module) -> None:
    """Copies every parameter of ``src`` into the same-shaped ``dst``."""
    src_state, dst_state = nnx.state(src, nnx.Param), nnx.state(dst, nnx.Param)
    src_shapes = jax.tree.map(jnp.shape, src_state)
    dst_shapes = jax.tree.map(jnp.shape, dst_state)
    if src_shapes != dst_shapes:
        raise ValueError(f"cannot copy {type(src).__name__} into {type(dst).__name__}: the parameter shapes differ")
    nnx.update(dst, jax.tree.map(jnp.array, src_state))


def copy_image_tower(student: AltCLIPModel, clip: CLIPModel) -> None:
    """AltCLIP's image side is CLIP's: ``vision_model``, ``visual_projection`` and ``logit_scale`` copied in."""
    _assign(student.vision_model, clip.vision_model)
    _assign(student.visual_projection, clip.visual_projection)
    student.logit_scale[...] = jnp.asarray(clip.logit_scale[...])


def set_text_projection(student: AltCLIPModel, teacher: CLIPTextTeacher, target: str) -> None:
    """The student's ``text_projection`` for a distillation ``target`` (see the module docstring)."""
    kernel = student.text_projection.kernel
    if target == "pooled":
        _assign(student.text_projection, teacher.text_projection)
    elif target == "projected":
        if kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"target 'projected' needs project_dim == projection_dim, got {kernel.shape}")
        kernel[...] = jnp.eye(kernel.shape[0], dtype=kernel.dtype)
    else:
        raise ValueError(f"distill.target must be one of {TARGETS}, got {target!r}")


def load_xlm_roberta(student: AltCLIPModel, path: str) -> None:
    """Loads an HF XLM-R checkpoint (``XLMRobertaModel`` or ``...ForMaskedLM``: keys with or without
    ``roberta.``; pooler and LM head ignored) into the student's ``text_model.roberta``; the
    ``pre_LN`` and ``transformation`` that AltCLIP adds keep their initialisation."""
    from altjax import checkpoint
    from altjax.conversion import bert, xlm_roberta
    from altjax.conversion.engine import Row, Table, load_params, model_shapes, torch_to_nnx

    roberta = student.text_model.roberta
    rows = list(bert.EMBEDDINGS)
    for i in range(student.config.text_config.num_hidden_layers):
        rows += [xlm_roberta._in_layers(Row(r.torch.format(i=i), r.nnx.format(i=i), r.layout)) for r in bert.LAYER]
    weights = checkpoint.open_weights(path)
    tensors = {k[len("roberta."):] if k.startswith("roberta.") else k: weights[k] for k in weights.keys()}
    table = Table(rows=tuple(rows), aliases=xlm_roberta.ALIASES,
                  ignore=tuple(bert.IGNORED_BUFFERS) + (r"^pooler\.", r"^lm_head\."))
    load_params(roberta, torch_to_nnx(tensors, table, model_shapes(roberta), source=path))


def build_model(config, processor_dir: str, mesh):
    """``(model, processor)`` of a run of kind ``config.model.kind`` (see the module docstring);
    the processor (the student's for ``"distill"``) is saved in ``processor_dir``, the teacher's
    tokenizer in ``processor_dir/teacher_tokenizer``."""
    from altjax import sharding

    kind = config.model.kind
    if kind not in KINDS:
        raise ValueError(f"model.kind must be 'align' or one of {KINDS}, got {kind!r}")
    dtype = jnp.dtype(config.model.dtype)
    seed = int(config.seed)
    tokenizer = load_tokenizer(config.data.tokenizer or config.model.init_from, os.path.join(processor_dir, ".tokenizer"),
                               "data.tokenizer" if config.data.tokenizer else "model.init_from")
    image_size = int(config.model.vision.image_size)
    processor = processor_for(tokenizer, image_size, processor_dir, int(config.data.max_length))
    if kind == "clip":
        if config.model.init_from:
            return CLIPModel.from_pretrained(config.model.init_from, dtype=dtype, seed=seed, mesh=mesh), processor
        clip = clip_config(config, len(tokenizer))
        return sharding.sharded_init(lambda: CLIPModel(clip, dtype=dtype, rngs=nnx.Rngs(seed)), mesh), processor

    if config.model.init_from:
        student = AltCLIPModel.from_pretrained(config.model.init_from, dtype=dtype, seed=seed, mesh=mesh)
    else:
        student = sharding.sharded_init(
            lambda: AltCLIPModel(altclip_config(config, len(tokenizer)), dtype=dtype, rngs=nnx.Rngs(seed)), mesh)
        if config.model.get("text_init_from", ""):
            load_xlm_roberta(student, config.model.text_init_from)
    teacher_dir = config.distill.teacher if kind == "distill" else config.model.get("image_tower_from", "")
    if not teacher_dir:
        if kind == "distill":
            raise ValueError("phase 1 needs a teacher: set distill.teacher to a CLIP directory")
        return student, processor
    clip = CLIPModel.from_pretrained(teacher_dir, dtype=dtype, seed=seed, mesh=mesh)
    copy_image_tower(student, clip)
    if kind == "altclip":
        return student, processor
    teacher = clip.text_teacher()
    set_text_projection(student, teacher, config.distill.target)
    teacher_tokenizer = os.path.join(processor_dir, TEACHER_TOKENIZER_DIR)
    name = config.distill.teacher_tokenizer or teacher_dir
    if name == "scenes-clip":
        scenes_clip_tokenizer(teacher_tokenizer, vocab_size=clip.config.text_config.vocab_size)
    else:
        load_tokenizer(name, teacher_tokenizer, "distill.teacher_tokenizer" if config.distill.teacher_tokenizer
                       else "distill.teacher").save_pretrained(teacher_tokenizer)
    return DistillModel(student, teacher), processor


def exported(model: nnx.Module) -> nnx.Module:
    """The model a run evaluates and saves: the student of a :class:`DistillModel`, else the model."""
    return model.student if isinstance(model, DistillModel) else model


# ----- objectives -----

def distill_objective(*, target: str = "pooled") -> Objective:
    """Phase 1: ``mean((student(B) - teacher(A))^2)`` over the batch and the embedding width
    (PyTorch's ``MSELoss``), the student's transformed [CLS] against the teacher's EOS embedding,
    before (``"pooled"``) or after (``"projected"``) its ``text_projection``. Metrics: ``cosine``,
    the mean cosine similarity of the pairs, and ``same_language_fraction`` of the batch."""
    if target not in TARGETS:
        raise ValueError(f"distill.target must be one of {TARGETS}, got {target!r}")

    def features(model, batch):
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        if target == "pooled":
            goal = model.teacher(ids, mask).pooler_output
        else:
            goal = model.teacher.get_text_features(ids, mask)
        student = model.student.text_model(batch["student_input_ids"], attention_mask=batch["student_attention_mask"])
        return {"student": student.pooler_output.astype(jnp.float32),
                "teacher": jax.lax.stop_gradient(goal.astype(jnp.float32)),
                "same_language": batch["same_language"].astype(jnp.float32)}

    def loss(model, feats, mesh):
        del model, mesh
        value = jnp.mean(jnp.square(feats["student"] - feats["teacher"]))
        cos = jnp.sum(layers.l2_normalize(feats["student"]) * layers.l2_normalize(feats["teacher"]), axis=-1)
        return value, {"cosine": jnp.mean(cos), "same_language_fraction": jnp.mean(feats["same_language"])}

    return Objective(features, loss)


def clip_objective(*, kind: str = "softmax", label_smoothing: float = 0.0, learn_temperature: bool = True,
                   impl: str = "gather") -> Objective:
    """CLIP's (and AltCLIP phase 2's) loss: the symmetric contrastive loss of the normalised
    embeddings with logits scaled by ``exp(logit_scale)`` (:func:`altjax.losses.contrastive_loss`,
    sharded; ``kind`` "softmax", or "sigmoid" with the bias
    :func:`altjax.train_step.logit_bias`).
    ``learn_temperature=False`` holds ``logit_scale`` at its value (no gradient reaches it)."""

    def features(model, batch):
        image = model.get_image_features(batch["pixel_values"])
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return normalised(image, text)

    return contrastive_objective(features, lambda model: jnp.exp(model.logit_scale[...]), kind=kind,
                                 label_smoothing=label_smoothing, learn_temperature=learn_temperature, impl=impl)


def objective(config) -> Objective:
    """The objective of ``config.loss`` for ``name`` "distill" or "clip"."""
    if config.loss.name == "distill":
        return distill_objective(target=config.distill.target)
    return clip_objective(kind=config.loss.get("kind", "softmax"), label_smoothing=float(config.loss.label_smoothing),
                          learn_temperature=bool(config.loss.get("learn_temperature", True)), impl=config.loss.impl)


# ----- input pipelines -----

def image_text_source(data) -> tuple[Any, tuple[str, ...]]:
    """``(source, caption fields)`` of a CLIP / phase-2 ``config.data``: the scenes dataset with the
    captions of ``data.langs``, or any source :func:`altjax.train.build_source` reads (tfds,
    webdataset, tfrecord, array_record) with one caption field per language in
    ``data.caption_keys``."""
    from altjax.data import scenes
    from altjax.train import build_source

    if data.source == "scenes":
        source = scenes.source(data.split, data_dir=data.data_dir or None, config=scenes.scenes_config(**data.scenes))
        return source, tuple(f"caption_{lang}" for lang in data.langs)
    keys = tuple(data.get("caption_keys", ()) or ())
    if not keys:
        raise ValueError(f"data.source {data.source!r}: set data.caption_keys to the caption field of each "
                         "language, e.g. ('en.txt', 'zh.txt') for a WebDataset")
    return build_source(data, data.split, caption_key=keys[0]), keys


def build_pipeline(config, processor, processor_dir: str, mesh):
    """This process's input pipeline: parallel text for ``"distill"``, else images with captions
    (:func:`image_text_source`), one caption field drawn per example and epoch."""
    from transformers import AutoTokenizer

    from altjax.data import InputPipeline, parallel
    from altjax.data.preprocess import ImageTransform, TextField, clip_image_config
    from altjax.sharding import process_batch_rows

    rows = process_batch_rows(mesh, int(config.batch_size))
    data = config.data
    length = int(data.max_length)
    if config.model.kind == "distill":
        teacher = AutoTokenizer.from_pretrained(os.path.join(processor_dir, TEACHER_TOKENIZER_DIR))
        return parallel.ParallelTextPipeline(
            parallel.pairs_from_config(data), batch_size=rows.stop - rows.start,
            teacher=TextField(teacher, max_length=int(config.distill.teacher_max_length)),
            student=TextField(processor.tokenizer, max_length=length), seed=int(config.seed),
            process_index=jax.process_index(), process_count=jax.process_count())
    source = parallel.MultilingualCaptions(*image_text_source(data))
    image = ImageTransform(clip_image_config(int(config.model.vision.image_size)), data.augment or None)
    return InputPipeline(source, batch_size=rows.stop - rows.start, image=image,
                         texts=TextField(processor.tokenizer, max_length=length), seed=int(config.seed),
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         num_threads=data.num_threads or None, prefetch=int(data.prefetch))

