"""Every value of a training config checked before a run touches its workdir.

A mistake in a config (a misspelt optimiser, a batch the mesh cannot split, a data file that is
not there) must cost the user one line and no work: :func:`validate` collects every problem of a
config at once and raises :class:`ConfigError` with all of them, each naming its key, before
anything is built, compiled or written. What it cannot know without building the run (a
tokenizer directory that is not a tokenizer, a checkpoint that does not fit) is left to the code
that reads it, which raises its own error naming the path.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Optional

import jax

from altjax import losses, optim, sharding
from altjax.data.preprocess import AUGMENTATIONS
from altjax.evaluation.datasets import SCENES_NAMES, TASKS, TFDS_DATASETS
from altjax.models import align, altclip, clip

KINDS = ("align", "clip", "altclip", "distill")
# The model_type of the init_from directory (an HF or altjax directory) each kind reads.
MODEL_TYPES = {"align": align.MODEL_TYPE, "clip": clip.MODEL_TYPE, "altclip": altclip.MODEL_TYPE,
               "distill": altclip.MODEL_TYPE}
PRESETS = {"align": align.PRESETS, "clip": clip.PRESETS, "altclip": altclip.PRESETS, "distill": altclip.PRESETS}
CONFIG_CLASSES = {"align": align.AlignConfig, "clip": clip.CLIPConfig, "altclip": altclip.AltCLIPConfig,
                  "distill": altclip.AltCLIPConfig}
# The loss each kind trains with (config.loss.name).
LOSS_NAMES = {"align": "align", "clip": "clip", "altclip": "clip", "distill": "distill"}
SOURCES = {"align": ("scenes", "tfds", "webdataset", "tfrecord", "array_record"),
           "clip": ("scenes", "tfds", "webdataset", "tfrecord", "array_record"),
           "altclip": ("scenes", "tfds", "webdataset", "tfrecord", "array_record"),
           "distill": ("scenes", "files")}
# Tokenizers altjax builds from the scenes captions, by kind; anything else is a directory.
BUILT_TOKENIZERS = {"align": ("scenes",), "clip": ("scenes-clip", "scenes-xlmr"),
                    "altclip": ("scenes-clip", "scenes-xlmr"), "distill": ("scenes-clip", "scenes-xlmr")}
SCENES_LANGS = ("en", "zh")
DTYPES = ("float32", "bfloat16", "float16")
DISTILL_TARGETS = ("pooled", "projected")


class ConfigError(ValueError):
    """A config value a run cannot use (the user's mistake: one line, exit status 2)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    """Collects the problems of one config, each ``"key: what is wrong"``."""

    def __init__(self, config):
        self.config = config
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        node = self.config
        for part in key.split("."):
            if not hasattr(node, "get") or part not in node:
                return default
            node = node[part]
        return node

    def has(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            self.fail(key, "missing (every training config has it; see configs/demo.py)")
            return None
        return value

    def integer(self, key: str, low: int, *, required: bool = True) -> Optional[int]:
        if not required and not self.has(key):
            return None
        value = self.require(key)
        if value is None:
            return None
        if not _is_int(value):
            self.fail(key, f"expected an integer, got {value!r}")
            return None
        if value < low:
            self.fail(key, f"must be at least {low}, got {value}")
            return None
        return value

    def number(self, key: str, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
               high_open: bool = False, required: bool = True) -> Optional[float]:
        if not required and not self.has(key):
            return None
        value = self.require(key)
        if value is None:
            return None
        if not _is_number(value) or not math.isfinite(value):
            self.fail(key, f"expected a finite number, got {value!r}")
            return None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            self.fail(key, f"must be in {interval}, got {value!r}")
            return None
        return float(value)

    def boolean(self, key: str, *, required: bool = True) -> None:
        if not required and not self.has(key):
            return
        value = self.require(key)
        if value is not None and not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")

    def string(self, key: str, *, required: bool = True) -> Optional[str]:
        if not required and not self.has(key):
            return None
        value = self.require(key)
        if value is not None and not isinstance(value, str):
            self.fail(key, f"expected a string, got {value!r}")
            return None
        return value

    def choice(self, key: str, choices, *, default: Any = None, required: bool = True):
        if not required and not self.has(key):
            return default
        value = self.require(key)
        if value is None:
            return None
        if value not in choices:
            names = ", ".join(repr(c) for c in choices)
            self.fail(key, f"unknown {value!r}; choose one of {names}")
            return None
        return value

    def directory(self, key: str, *, want: str) -> Optional[str]:
        """``key`` names an existing directory holding ``want`` (a file name), or is empty."""
        path = self.string(key, required=False)
        if not path:
            return None
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            self.fail(key, f"{path} is not a directory")
            return None
        if want and not os.path.isfile(os.path.join(path, want)):
            self.fail(key, f"{path} has no {want}")
            return None
        return path


_MISSING = object()


def _model_type(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value.get("model_type") if isinstance(value, dict) else None


def _check_model_dir(c: _Checker, key: str, expected: str) -> None:
    path = c.directory(key, want="config.json")
    if path is None:
        return
    got = _model_type(path)
    if got is None:
        c.fail(key, f"{path}/config.json is not a JSON object with a model_type")
    elif got != expected:
        c.fail(key, f"{path} holds a {got!r} model, this run needs {expected!r}")


def _check_files(c: _Checker, key: str, separator: Optional[str]) -> None:
    files = c.get(key)
    patterns = [files] if isinstance(files, str) else list(files or ())
    if separator:
        patterns = [p for item in patterns for p in item.split(separator)]
    patterns = [os.path.expanduser(p) for p in patterns if p]
    if not patterns:
        c.fail(key, "empty; give the data files (a path or a glob pattern)")
    for pattern in patterns:
        if not glob.has_magic(pattern):
            if not os.path.isfile(pattern):
                c.fail(key, f"{pattern}: {'is not a file' if os.path.exists(pattern) else 'no such file'}")
            continue
        matches = glob.glob(pattern)
        if not matches:
            c.fail(key, f"no file matches {pattern!r}")
        elif not all(os.path.isfile(m) for m in matches):
            c.fail(key, f"{next(m for m in matches if not os.path.isfile(m))} is not a file")


def _check_mesh_and_batch(c: _Checker) -> None:
    mesh = c.require("mesh")
    if mesh is None:
        return
    data, model = mesh.get("data", -1), mesh.get("model", 1)
    if not (_is_int(data) and _is_int(model)) or set(mesh) - {"data", "model"}:
        c.fail("mesh", f"expected {{'data': int, 'model': int}}, got {dict(mesh)!r}")
        return
    try:
        mesh = sharding.make_mesh(data=data, model=model)
    except ValueError as e:
        c.fail("mesh", str(e))
        return
    batch, accum = c.get("batch_size"), c.get("grad_accum_steps")
    if _is_int(batch) and _is_int(accum) and batch >= 1 and accum >= 1:
        divisor = sharding.batch_size_divisor(mesh) * accum
        if batch % divisor:
            c.fail("batch_size", f"{batch} is not a multiple of the {sharding.batch_size_divisor(mesh)} data-parallel "
                   f"devices x grad_accum_steps {accum} = {divisor}; use e.g. {max(divisor, batch // divisor * divisor)}")


def _check_model(c: _Checker, kind: str) -> None:
    c.choice("model.dtype", DTYPES)
    preset = c.choice("model.preset", sorted(PRESETS[kind]))
    init_from = c.get("model.init_from", "")
    _check_model_dir(c, "model.init_from", MODEL_TYPES[kind])
    if kind != "clip":
        _check_model_dir(c, "model.image_tower_from", clip.MODEL_TYPE)
        c.directory("model.text_init_from", want="config.json")
    c.integer("model.projection_dim", 1, required=False)
    if kind == "align":
        c.number("model.temperature_init_value", low=0.0, low_open=True)
    if preset is None or init_from:
        return
    base = CONFIG_CLASSES[kind].from_preset(preset)
    for tower, sub in (("text", base.text_config), ("vision", base.vision_config)):
        values = c.get(f"model.{tower}", {}) or {}
        fields = set(getattr(sub, "__dataclass_fields__", {}))
        unknown = sorted(set(values) - fields)
        if unknown:
            c.fail(f"model.{tower}", f"unknown field(s) {', '.join(unknown)} for {type(sub).__name__}")
        for name, value in values.items():
            if name == "vocab_size" and value == -1:
                continue
            if name in fields and _is_int(getattr(sub, name, None)) and not (_is_int(value) and value >= 1):
                c.fail(f"model.{tower}.{name}", f"expected a positive integer, got {value!r}")


def _check_data(c: _Checker, kind: str) -> None:
    source = c.choice("data.source", SOURCES[kind])
    init_from = c.get("model.init_from", "")
    tokenizer = c.string("data.tokenizer")
    if tokenizer is not None and tokenizer not in BUILT_TOKENIZERS[kind]:
        if not tokenizer:
            if not init_from:
                c.fail("data.tokenizer", "empty and model.init_from is empty: give "
                       f"{' or '.join(repr(t) for t in BUILT_TOKENIZERS[kind])} or a tokenizer directory")
        elif not os.path.isdir(os.path.expanduser(tokenizer)):
            c.fail("data.tokenizer", f"{tokenizer!r} is neither a directory nor one of "
                   f"{', '.join(repr(t) for t in BUILT_TOKENIZERS[kind])}")
    c.integer("data.max_length", 1)
    c.string("data.split")
    if kind == "align" and c.get("data.lang") is not None:
        lang = c.string("data.lang")
        if source == "scenes":
            c.choice("data.lang", SCENES_LANGS)
        if tokenizer == "scenes" and lang not in (None, "en"):
            c.fail("data.tokenizer", f"'scenes' is an English tokenizer, data.lang is {lang!r}; give a tokenizer "
                   "directory")
    if kind in ("clip", "altclip") and source == "scenes":
        langs = c.get("data.langs", ())
        bad = [lang for lang in langs or () if lang not in SCENES_LANGS]
        if not langs or bad:
            c.fail("data.langs", f"expected languages among {SCENES_LANGS}, got {tuple(langs or ())!r}")
    if kind != "distill":
        augment = c.get("data.augment", "")
        if (augment or None) not in AUGMENTATIONS:
            c.fail("data.augment", f"unknown {augment!r}; choose one of "
                   f"{', '.join(repr(a) for a in AUGMENTATIONS if a)} or ''")
        c.integer("data.num_threads", 0)
        c.integer("data.prefetch", 0)
    if source == "tfds" and not c.get("data.name"):
        c.fail("data.name", "empty; data.source 'tfds' needs the tfds dataset name")
    elif source in ("webdataset", "tfrecord", "array_record"):
        _check_files(c, "data.files", None)
    elif source == "files":
        _check_files(c, "data.files", ",")
    if kind in ("clip", "altclip") and source not in (None, "scenes") and not c.get("data.caption_keys"):
        c.fail("data.caption_keys", f"empty; data.source {source!r} needs the caption field of each language, "
               "e.g. ('en.txt', 'zh.txt')")
    scenes_config = c.get("data.scenes")
    if scenes_config is not None:
        fields = ("image_size", "num_train", "num_validation", "num_test", "seed")
        unknown = sorted(set(scenes_config) - set(fields))
        if unknown:
            c.fail("data.scenes", f"unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        for name in fields:
            if name in scenes_config:
                c.integer(f"data.scenes.{name}", 0 if name == "seed" else 1)


def _check_optimizer(c: _Checker) -> None:
    c.choice("optimizer.name", optim.OPTIMIZERS)
    c.choice("optimizer.decay", optim.DECAYS)
    c.number("optimizer.learning_rate", low=0.0)
    c.integer("optimizer.warmup_steps", 0)
    c.number("optimizer.end_factor", low=0.0)
    c.number("optimizer.weight_decay", low=0.0)
    c.number("optimizer.b1", low=0.0, high=1.0, high_open=True)
    c.number("optimizer.b2", low=0.0, high=1.0, high_open=True)
    c.number("optimizer.eps", low=0.0, low_open=True)
    c.number("optimizer.grad_clip_norm", low=0.0)


def _check_loss(c: _Checker, kind: str) -> None:
    name = c.require("loss.name")
    if name is not None and name != LOSS_NAMES[kind]:
        c.fail("loss.name", f"{name!r} does not train a model.kind {kind!r} run; use {LOSS_NAMES[kind]!r}")
    if kind != "distill":
        c.choice("loss.kind", losses.KINDS, required=False)
        c.choice("loss.impl", losses.IMPLS)
        c.number("loss.label_smoothing", low=0.0, high=1.0, high_open=True)
        c.boolean("loss.learn_bias", required=False)
        c.boolean("loss.learn_temperature", required=False)
    else:
        c.choice("distill.target", DISTILL_TARGETS)
        c.integer("distill.teacher_max_length", 1)
        teacher = c.get("distill.teacher", "")
        if not teacher:
            c.fail("distill.teacher", "empty; phase 1 needs a CLIP directory as its teacher")
        else:
            _check_model_dir(c, "distill.teacher", clip.MODEL_TYPE)
        name = c.get("distill.teacher_tokenizer", "")
        if name and name not in BUILT_TOKENIZERS["distill"] and not os.path.isdir(os.path.expanduser(name)):
            c.fail("distill.teacher_tokenizer", f"{name!r} is neither a directory nor 'scenes-clip'")


def _check_eval(c: _Checker) -> None:
    c.integer("eval.batch_size", 1)
    c.boolean("eval.at_start")
    c.boolean("eval.at_end")
    c.string("eval.split")
    for spec in c.get("eval.datasets", ()) or ():
        parts = str(spec).split("/")
        if len(parts) != 3 or not all(parts):
            c.fail("eval.datasets", f"{spec!r} is not 'task/dataset/lang' (e.g. 'retrieval/scenes/en')")
            continue
        task, name, lang = parts
        if task not in TASKS:
            c.fail("eval.datasets", f"{spec!r}: unknown task {task!r}; choose one of {', '.join(TASKS)}")
        elif name in SCENES_NAMES:
            if lang not in SCENES_LANGS:
                c.fail("eval.datasets", f"{spec!r}: the scenes set has captions in {', '.join(SCENES_LANGS)}")
        elif name in TFDS_DATASETS:
            if TFDS_DATASETS[name].task != task:
                c.fail("eval.datasets", f"{spec!r}: {name} is a {TFDS_DATASETS[name].task} dataset")
        elif not os.path.isdir(os.path.expanduser(name)):
            c.fail("eval.datasets", f"{spec!r}: {name!r} is neither a directory nor one of "
                   f"{', '.join([*SCENES_NAMES, *sorted(TFDS_DATASETS)])}")


def validate(config) -> list[str]:
    """Raises ConfigError listing every problem of ``config``; returns warnings (suspicious but
    valid values, e.g. a run that ends before its warmup does)."""
    c = _Checker(config)
    kind = c.get("model.kind", "align")
    if kind not in KINDS:
        c.fail("model.kind", f"unknown {kind!r}; choose one of {', '.join(KINDS)}")
        kind = None
    c.integer("seed", 0)
    total = c.integer("total_steps", 1)
    c.integer("batch_size", 1)
    c.integer("log_every", 1)
    c.integer("checkpoint_every", 1)
    c.integer("eval_every", 0)
    c.integer("keep_checkpoints", 1)
    c.integer("grad_accum_steps", 1)
    c.integer("warn_chance_steps", 0, required=False)
    c.boolean("async_checkpoints")
    c.boolean("remat")
    policy = c.string("remat_policy")
    if policy is not None and not callable(getattr(jax.checkpoint_policies, policy, None)):
        c.fail("remat_policy", f"{policy!r} is not a jax.checkpoint_policies name (e.g. 'nothing_saveable', "
               "'dots_with_no_batch_dims_saveable')")
    freeze = c.string("freeze")
    if freeze:
        try:
            re.compile(freeze)
        except re.error as e:
            c.fail("freeze", f"{freeze!r} is not a regular expression ({e})")
    _check_mesh_and_batch(c)
    if kind is not None:
        _check_model(c, kind)
        _check_data(c, kind)
        _check_loss(c, kind)
    _check_optimizer(c)
    _check_eval(c)
    if c.problems:
        raise ConfigError("; ".join(c.problems))
    warnings = []
    warmup = c.get("optimizer.warmup_steps")
    if total is not None and _is_int(warmup) and total < warmup:
        warnings.append(f"total_steps {total} is below optimizer.warmup_steps {warmup}: the run ends before its "
                        "warmup does, at a learning rate below optimizer.learning_rate")
    return warnings


def pretrained_tokenizer(name: str, key: str):
    """``AutoTokenizer.from_pretrained(name)``, or ConfigError naming ``key`` when ``name`` holds no
    tokenizer transformers can load (the check needs the load itself)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: {name} holds no tokenizer transformers can load ({first[:200]})") from None
