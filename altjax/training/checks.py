"""Every value of a training config checked before a run touches its workdir.

A mistake in a config (a misspelt optimiser, a batch the mesh cannot split, a data file that is
not there) must cost the user one line and no work: a :class:`Checker` collects every problem of a
config at once, each naming its key, and :meth:`Checker.finish` raises :class:`ConfigError` with
all of them, before anything is built, compiled or written. :func:`check_common` checks what every
run has (steps, mesh, optimiser, evaluation); each training task checks its own part with the
helpers here (:mod:`altjax.training.tasks`). What cannot be known without building the run (a
tokenizer directory that is not a tokenizer, a checkpoint that does not fit) is left to the code
that reads it, which raises its own error naming the path.
"""
from __future__ import annotations

import glob
import math
import os
import re
from typing import Any, Optional

import jax

from altjax import hub, losses, sharding
from altjax.data.preprocess import AUGMENTATIONS
from altjax.evaluation.datasets import SCENES_NAMES, TASKS, TFDS_DATASETS
from altjax.model_io import directories
from altjax.processing import load_tokenizer, processor_dir
from altjax.training import optim

SCENES_LANGS = ("en", "zh")
DTYPES = ("float32", "bfloat16", "float16")
SOURCES = ("scenes", "tfds", "webdataset", "tfrecord", "array_record")


class ConfigError(ValueError):
    """A config value a run cannot use (the user's mistake: one line, exit status 2)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checker:
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

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            self.fail(key, "missing (every config of this task has it; see the recipes in configs/)")
            return None
        return value

    def integer(self, key: str, low: int) -> Optional[int]:
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
               high_open: bool = False) -> Optional[float]:
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

    def boolean(self, key: str) -> None:
        value = self.require(key)
        if value is not None and not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")

    def string(self, key: str) -> Optional[str]:
        value = self.require(key)
        if value is not None and not isinstance(value, str):
            self.fail(key, f"expected a string, got {value!r}")
            return None
        return value

    def choice(self, key: str, choices):
        value = self.require(key)
        if value is None:
            return None
        if value not in choices:
            names = ", ".join(repr(c) for c in choices)
            self.fail(key, f"unknown {value!r}; choose one of {names}")
            return None
        return value

    def finish(self) -> None:
        """Raises ConfigError listing every problem found, if any."""
        if self.problems:
            raise ConfigError("; ".join(self.problems))

    def directory(self, key: str, *, want: str, resolve=None) -> Optional[str]:
        """``key`` names an existing directory holding ``want`` (a file name), or is empty.
        ``resolve`` (such as ``directories.model_dir``, which fetches a Hub id into the Hub cache)
        turns the name into the directory first; its ``ValueError`` is the key's problem."""
        path = self.string(key)
        if not path:
            return None
        path = os.path.expanduser(path)
        if resolve is not None:
            try:
                path = resolve(path)
            except ValueError as e:
                self.fail(key, str(e))
                return None
        if not os.path.isdir(path):
            self.fail(key, f"{path} is not a directory")
            return None
        if want and not os.path.isfile(os.path.join(path, want)):
            self.fail(key, f"{path} has no {want}")
            return None
        return path


_MISSING = object()


def check_model_dir(c: Checker, key: str, expected: str) -> None:
    """``key`` is empty or names a model directory of ``model_type`` ``expected``, or a Hugging
    Face Hub id of one (fetched into the Hub cache now: the run reads it anyway, and a missing
    id or an offline cache without it is then found before anything is built)."""
    path = c.directory(key, want="config.json", resolve=directories.model_dir)
    if path is None:
        return
    try:
        got = directories.read_config(path).get("model_type")
    except directories.CheckpointError as e:
        c.fail(key, str(e))
        return
    if got != expected:
        c.fail(key, f"{path} holds a {got!r} model, this run needs {expected!r}")


def check_files(c: Checker, key: str, separator: Optional[str]) -> None:
    """``key`` names data files (paths or glob patterns, split at ``separator``) that exist."""
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


def check_model(c: Checker, *, model_type: str, presets, config_class) -> None:
    """``config.model`` of a run of a ``config_class`` model: its ``dtype``, ``preset`` (one of
    ``presets``), ``init_from`` (empty or a ``model_type`` directory), ``projection_dim``, and the
    ``text``/``vision`` fields that replace the preset's (names, positive integers and booleans
    such as ``scan_layers``; ``text.vocab_size`` -1: the tokenizer's)."""
    c.choice("model.dtype", DTYPES)
    preset = c.choice("model.preset", sorted(presets))
    check_model_dir(c, "model.init_from", model_type)
    c.integer("model.projection_dim", 1)
    if preset is None or c.get("model.init_from"):
        return
    base = config_class.from_preset(preset)
    for tower, sub in (("text", base.text_config), ("vision", base.vision_config)):
        values = c.require(f"model.{tower}") or {}
        fields = set(getattr(sub, "__dataclass_fields__", {}))
        unknown = sorted(set(values) - fields)
        if unknown:
            c.fail(f"model.{tower}", f"unknown field(s) {', '.join(unknown)} for {type(sub).__name__}")
        if tower == "text" and "vocab_size" not in values:
            c.fail("model.text.vocab_size", "missing; give the vocabulary size, or -1 for the tokenizer's")
        for name, value in values.items():
            if name == "vocab_size" and value == -1:
                continue
            if name in fields and _is_int(getattr(sub, name, None)) and not (_is_int(value) and value >= 1):
                c.fail(f"model.{tower}.{name}", f"expected a positive integer, got {value!r}")
            if name in fields and isinstance(getattr(sub, name, None), bool) and not isinstance(value, bool):
                c.fail(f"model.{tower}.{name}", f"expected true or false, got {value!r}")


def check_tokenizer(c: Checker, key: str, built) -> Optional[str]:
    """``key`` is one of the tokenizers altjax ``built`` from the scenes captions, a directory or a
    Hugging Face Hub id (``org/name``, fetched when the tokenizer is loaded); empty is allowed
    where ``model.init_from`` gives one."""
    tokenizer = c.string(key)
    if tokenizer is None or tokenizer in built:
        return tokenizer
    if not tokenizer:
        if not c.get("model.init_from"):
            c.fail(key, f"empty and model.init_from is empty: give {' or '.join(repr(t) for t in built)} or a "
                   "tokenizer directory")
    elif not is_tokenizer_name(tokenizer):
        c.fail(key, f"{tokenizer!r} is neither a directory, a Hub id (org/name) nor one of "
               f"{', '.join(repr(t) for t in built)}")
    return tokenizer


def is_tokenizer_name(name: str) -> bool:
    """Whether ``name`` can name a pretrained tokenizer: an existing directory or a Hub id."""
    path = os.path.expanduser(name)
    return os.path.isdir(path) or (not os.path.exists(path) and hub.is_hub_id(name))


def check_source(c: Checker, sources=SOURCES) -> Optional[str]:
    """``config.data``'s source (one of ``sources``) and what it reads: a tfds name, data files,
    the scenes dataset's settings; ``max_length`` and ``split``. Returns the source."""
    source = c.choice("data.source", sources)
    c.integer("data.max_length", 1)
    c.string("data.split")
    if source == "tfds" and not c.get("data.name"):
        c.fail("data.name", "empty; data.source 'tfds' needs the tfds dataset name")
    elif source in ("webdataset", "tfrecord", "array_record"):
        check_files(c, "data.files", None)
    elif source == "files":
        check_files(c, "data.files", ",")
    scenes_config = c.require("data.scenes")
    if scenes_config is not None:
        fields = ("image_size", "num_train", "num_validation", "num_test", "seed")
        unknown = sorted(set(scenes_config) - set(fields))
        if unknown:
            c.fail("data.scenes", f"unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        for name in fields:
            if name in scenes_config:
                c.integer(f"data.scenes.{name}", 0 if name == "seed" else 1)
    return source


def check_image_input(c: Checker) -> None:
    """The image side of ``config.data``: augmentation, decoding threads, prefetch."""
    augment = c.require("data.augment")
    if augment is not None and (augment or None) not in AUGMENTATIONS:
        c.fail("data.augment", f"unknown {augment!r}; choose one of {', '.join(repr(a) for a in AUGMENTATIONS if a)} "
               "or ''")
    c.integer("data.num_threads", 0)
    c.integer("data.prefetch", 0)


def check_contrastive_loss(c: Checker) -> None:
    """``config.loss`` of a contrastive objective (:func:`altjax.training.objectives.contrastive`)."""
    c.choice("loss.kind", losses.KINDS)
    c.choice("loss.impl", losses.IMPLS)
    c.number("loss.label_smoothing", low=0.0, high=1.0, high_open=True)
    c.boolean("loss.learn_bias")
    c.boolean("loss.learn_temperature")


def _check_mesh_and_batch(c: Checker) -> None:
    mesh = c.require("mesh")
    if mesh is None:
        return
    data, model = mesh.get("data"), mesh.get("model")
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


def _check_optimizer(c: Checker) -> None:
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
    no_decay = c.string("optimizer.no_decay")
    if no_decay:
        try:
            re.compile(no_decay)
        except re.error as e:
            c.fail("optimizer.no_decay", f"{no_decay!r} is not a regular expression ({e})")


def _check_eval(c: Checker) -> None:
    c.integer("eval.batch_size", 1)
    c.boolean("eval.at_start")
    c.boolean("eval.at_end")
    c.string("eval.split")
    for spec in c.require("eval.datasets") or ():
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


def check_common(c: Checker) -> list[str]:
    """What every training config has: steps, batch and mesh, checkpoints, remat, freezing, the
    optimiser, the evaluations. Returns warnings (suspicious but valid values, e.g. a run that ends
    before its warmup does)."""
    c.integer("seed", 0)
    total = c.integer("total_steps", 1)
    c.integer("batch_size", 1)
    c.integer("log_every", 1)
    c.integer("checkpoint_every", 1)
    c.integer("eval_every", 0)
    c.integer("keep_checkpoints", 1)
    c.integer("grad_accum_steps", 1)
    c.integer("warn_chance_steps", 0)
    c.string("compilation_cache_dir")
    c.number("peer_timeout_s", low=0.0)
    c.integer("profile.start_step", 0)
    c.integer("profile.num_steps", 1)
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
    _check_optimizer(c)
    _check_eval(c)
    warmup = c.get("optimizer.warmup_steps")
    if total is not None and _is_int(warmup) and total < warmup:
        return [f"total_steps {total} is below optimizer.warmup_steps {warmup}: the run ends before its warmup does, "
                "at a learning rate below optimizer.learning_rate"]
    return []


def pretrained_tokenizer(name: str, key: str):
    """The tokenizer of ``name`` (a directory, or a Hub id whose processor files are
    fetched into the Hub cache), or ConfigError naming ``key`` when ``name`` holds no tokenizer
    transformers can load (the check needs the load itself) or the Hub id cannot be had."""
    try:
        directory = processor_dir(os.path.expanduser(name))
    except hub.HubError as e:
        raise ConfigError(f"{key}: {e}") from None
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: {name} holds no tokenizer transformers can load ({first[:200]})") from None
