"""AltCLIP's two training phases, the tasks ``"altclip_distill"`` and ``"altclip_contrastive"``.

``"altclip_distill"``      phase 1 (``configs/altclip_distill.py``): a :class:`DistillModel` holding
                           the student ``AltCLIPModel`` and the frozen teacher ``CLIPTextTeacher``;
                           MSE between the teacher's embedding of sentence A and the student's of
                           sentence B over parallel pairs, identical-language pairs included
                           (:mod:`altjax.data.parallel`). Exports the student.
``"altclip_contrastive"``  phase 2 (``configs/altclip_contrastive.py``): an ``AltCLIPModel``,
                           image-text contrastive learning in both languages as the ``"clip"`` task
                           (:mod:`altjax.training.tasks.clip`), image tower frozen (``freeze``),
                           text side trained.

What the student regresses onto (``config.distill.target``):

``"pooled"`` (the recipe's): the teacher's EOS output *before* ``text_projection`` (CLIP text width),
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
name a tokenizer directory or a Hugging Face Hub id (``org/name``; the teacher, ``distill.teacher``,
may be one too), or build one from the scenes captions: ``"scenes-clip"`` (a word-level
English tokenizer laid out like CLIP's, for the ``clip-tiny`` preset: Chinese is unknown to it) and
``"scenes-xlmr"`` (an XLM-R Unigram tokenizer covering the English words and the Chinese characters).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from altjax import sharding
from altjax.model_io import directories
from altjax.model_io.engine import Table, load_params, model_shapes, torch_to_nnx
from altjax.model_io.hf_weights import open_weights
from altjax.data import parallel
from altjax.data.preprocess import TextField
from altjax.data.tokenizers import scenes_clip_tokenizer
from altjax.models import altclip, bert, clip, xlm_roberta
from altjax.models.clip_text import CLIPTextTeacher
from altjax.processing import load_tokenizer
from altjax.training import checks, objectives
from altjax.training.tasks import clip as clip_task
from altjax.training.tasks.base import Task

TARGETS = ("pooled", "projected")
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"


# ----- checks -----

def _check_student(c: checks.Checker) -> None:
    checks.check_model(c, model_type=altclip.MODEL_TYPE, presets=altclip.PRESETS, config_class=altclip.AltCLIPConfig)
    c.directory("model.text_init_from", want="config.json", resolve=directories.model_dir)


def check_distill(c: checks.Checker) -> None:
    _check_student(c)
    checks.check_source(c, ("scenes", "files"))
    checks.check_tokenizer(c, "data.tokenizer", clip_task.BUILT_TOKENIZERS)
    c.boolean("data.same_language_pairs")
    c.choice("distill.target", TARGETS)
    c.integer("distill.teacher_max_length", 1)
    if not c.require("distill.teacher"):
        c.fail("distill.teacher", "empty; phase 1 needs a CLIP directory as its teacher")
    else:
        checks.check_model_dir(c, "distill.teacher", clip.MODEL_TYPE)
    name = c.string("distill.teacher_tokenizer")
    if name and name not in clip_task.BUILT_TOKENIZERS and not checks.is_tokenizer_name(name):
        c.fail("distill.teacher_tokenizer", f"{name!r} is neither a directory, a Hub id (org/name) nor one of "
               f"{', '.join(repr(t) for t in clip_task.BUILT_TOKENIZERS)}")


def check_contrastive(c: checks.Checker) -> None:
    _check_student(c)
    checks.check_model_dir(c, "model.image_tower_from", clip.MODEL_TYPE)
    clip_task.check_image_text(c)


# ----- models -----

class DistillModel(nnx.Module):
    """Phase 1's pair: ``student`` (an ``AltCLIPModel``, whose text tower learns) and ``teacher``
    (a ``CLIPTextTeacher``, frozen). The step's parameter paths start with ``student/`` or ``teacher/``."""

    def __init__(self, student: altclip.AltCLIPModel, teacher: CLIPTextTeacher):
        self.student = student
        self.teacher = teacher


def model_config(config, vocab_size: int) -> altclip.AltCLIPConfig:
    """``config.model`` as an AltCLIPConfig: the preset with ``text``/``vision`` overrides
    (``text.vocab_size`` -1: the tokenizer's)."""
    base = altclip.AltCLIPConfig.from_preset(config.model.preset)
    text = clip_task.tower_overrides(config.model.text)
    if text["vocab_size"] == -1:
        text["vocab_size"] = vocab_size
    return dataclasses.replace(
        base, text_config=dataclasses.replace(base.text_config, **text),
        vision_config=dataclasses.replace(base.vision_config, **clip_task.tower_overrides(config.model.vision)),
        projection_dim=int(config.model.projection_dim))


def _assign(dst: nnx.Module, src: nnx.Module) -> None:
    """Copies every parameter of ``src`` into the same-shaped ``dst``."""
    src_state, dst_state = nnx.state(src, nnx.Param), nnx.state(dst, nnx.Param)
    src_shapes = jax.tree.map(jnp.shape, src_state)
    dst_shapes = jax.tree.map(jnp.shape, dst_state)
    if src_shapes != dst_shapes:
        raise ValueError(f"cannot copy {type(src).__name__} into {type(dst).__name__}: the parameter shapes differ")
    nnx.update(dst, jax.tree.map(jnp.array, src_state))


def copy_image_tower(student: altclip.AltCLIPModel, clip_model: clip.CLIPModel) -> None:
    """AltCLIP's image side is CLIP's: ``vision_model``, ``visual_projection`` and ``logit_scale`` copied in."""
    _assign(student.vision_model, clip_model.vision_model)
    _assign(student.visual_projection, clip_model.visual_projection)
    student.logit_scale[...] = jnp.asarray(clip_model.logit_scale[...])


def set_text_projection(student: altclip.AltCLIPModel, teacher: CLIPTextTeacher, target: str) -> None:
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


def load_xlm_roberta(student: altclip.AltCLIPModel, path: str) -> None:
    """Loads an HF XLM-R checkpoint (a directory or a Hub id; ``XLMRobertaModel`` or
    ``...ForMaskedLM``: keys with or without ``roberta.``; pooler and LM head ignored) into the
    student's ``text_model.roberta``; the ``pre_LN`` and ``transformation`` that AltCLIP adds keep
    their initialisation."""
    roberta = student.text_model.roberta
    rows = xlm_roberta.roberta_rows(student.config.text_config)
    weights = open_weights(directories.model_dir(path))
    tensors = {k[len("roberta."):] if k.startswith("roberta.") else k: weights[k] for k in weights.keys()}
    table = Table(rows=tuple(rows), aliases=xlm_roberta.ALIASES,
                  ignore=tuple(bert.IGNORED_BUFFERS) + (r"^pooler\.", r"^lm_head\."))
    load_params(roberta, torch_to_nnx(tensors, table, model_shapes(roberta), source=path))


def build_student(config, tokenizer_size: int, mesh) -> altclip.AltCLIPModel:
    """The AltCLIP of ``config.model``: ``init_from`` a directory, or initialised from the preset
    with ``text_init_from``'s XLM-R weights in its text encoder when that is set."""
    dtype, seed = jnp.dtype(config.model.dtype), int(config.seed)
    if config.model.init_from:
        return altclip.AltCLIPModel.from_pretrained(config.model.init_from, dtype=dtype, seed=seed, mesh=mesh)
    model_cfg = model_config(config, tokenizer_size)
    student = sharding.sharded_init(lambda rngs: altclip.AltCLIPModel(model_cfg, dtype=dtype, rngs=rngs), mesh,
                                    seed=seed)
    if config.model.text_init_from:
        load_xlm_roberta(student, config.model.text_init_from)
    return student


def _load_clip(path: str, config, mesh) -> clip.CLIPModel:
    return clip.CLIPModel.from_pretrained(path, dtype=jnp.dtype(config.model.dtype), seed=int(config.seed), mesh=mesh)


def build_contrastive(config, directory: str, mesh):
    """Phase 2's AltCLIP, its image tower copied in from ``model.image_tower_from`` when that is set."""
    processor = clip_task.build_processor(config, directory)
    student = build_student(config, len(processor.tokenizer), mesh)
    if config.model.image_tower_from:
        copy_image_tower(student, _load_clip(config.model.image_tower_from, config, mesh))
    return student, processor


def build_distill(config, directory: str, mesh):
    """Phase 1's :class:`DistillModel`: the student with the teacher CLIP's image tower and the
    text projection of ``distill.target``, and the teacher's text tower; the teacher's tokenizer
    is saved in ``directory/teacher_tokenizer``."""
    processor = clip_task.build_processor(config, directory)
    student = build_student(config, len(processor.tokenizer), mesh)
    teacher_clip = _load_clip(config.distill.teacher, config, mesh)
    copy_image_tower(student, teacher_clip)
    teacher = teacher_clip.text_teacher()
    set_text_projection(student, teacher, config.distill.target)
    teacher_tokenizer = os.path.join(directory, TEACHER_TOKENIZER_DIR)
    name = config.distill.teacher_tokenizer or config.distill.teacher
    if name == "scenes-clip":
        scenes_clip_tokenizer(teacher_tokenizer, vocab_size=teacher_clip.config.text_config.vocab_size)
    else:
        key = "distill.teacher_tokenizer" if config.distill.teacher_tokenizer else "distill.teacher"
        clip_task.load_tokenizer(name, teacher_tokenizer, key).save_pretrained(teacher_tokenizer)
    return DistillModel(student, teacher), processor


def student(model: DistillModel) -> nnx.Module:
    """What phase 1 evaluates and saves: the student."""
    return model.student


# ----- phase 1: pipeline and objective -----

def distill_pipeline(config, processor, directory: str, rows) -> parallel.ParallelTextPipeline:
    """This process's ``rows`` of every global batch of parallel text: the teacher's tokens of
    sentence A, the student's of sentence B."""
    teacher = load_tokenizer(os.path.join(directory, TEACHER_TOKENIZER_DIR))
    return parallel.ParallelTextPipeline(
        parallel.pairs_from_config(config.data), batch_size=int(config.batch_size), rows=rows,
        teacher=TextField(teacher, max_length=int(config.distill.teacher_max_length)),
        student=TextField(processor.tokenizer, max_length=int(config.data.max_length)), seed=int(config.seed))


def distill_objective(*, target: str) -> objectives.Objective:
    """Phase 1: the MSE of the student's transformed [CLS] (``pooler_output``) against the
    teacher's EOS embedding, before (``"pooled"``) or after (``"projected"``) its
    ``text_projection`` (:func:`altjax.training.objectives.regression`)."""
    if target not in TARGETS:
        raise ValueError(f"distill.target must be one of {TARGETS}, got {target!r}")

    def teacher(model, batch):
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        if target == "pooled":
            return model.teacher(ids, mask).pooler_output
        return model.teacher.get_text_features(ids, mask)

    def student_features(model, batch):
        out = model.student.text_model(batch["student_input_ids"], attention_mask=batch["student_attention_mask"])
        return out.pooler_output

    return objectives.regression(student_features, teacher)


DISTILL = Task("altclip_distill", check=check_distill, build=build_distill, pipeline=distill_pipeline,
               objective=lambda config: distill_objective(target=config.distill.target),
               export=student)
CONTRASTIVE = Task("altclip_contrastive", check=check_contrastive, build=build_contrastive,
                   pipeline=clip_task.pipeline, objective=clip_task.objective)
