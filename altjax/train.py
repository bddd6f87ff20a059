"""The training loop and its command line.

    altjax-train --config configs/demo.py --workdir DIR [--config.key=value ...]

``--config`` is a Python file whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(see ``configs/``). Each ``--config.a.b=value`` overrides one entry; the value is read as the
type of the entry it replaces (``true``/``false`` for booleans, a Python literal for tuples and
lists, the text itself for strings; an entry that is None takes a Python literal, else the text).

The workdir receives ``config.json`` (the resolved config), ``checkpoints/`` (orbax, every
``checkpoint_every`` steps, asynchronous, the last ``keep_checkpoints``), ``metrics.jsonl`` (one
JSON object per logged step: ``step``, ``loss``, ``learning_rate``, ``temperature``,
``grad_norm``, ``examples_per_sec``, ``skipped_examples``), TensorBoard event files,
``eval_results.json`` (the latest evaluation: every ``eval_every`` steps and at the end),
``evals.jsonl`` (every evaluation, one JSON object each: ``step`` and the results by
evaluation name, e.g. ``{"step": 200, "retrieval/scenes/en": {"t2i_r1": ...}}``) and, at the end, the trained
model in ``model/`` (an altjax directory with its processor files: ``altjax-eval --checkpoint
DIR/model`` reads it). Run again on the same workdir, it resumes from the newest checkpoint that
restores: the parameters, optimiser, BatchNorm statistics, dropout keys and input pipeline
position are all in the checkpoint, so the resumed run computes the same losses, step for step,
as one that was never interrupted; ``metrics.jsonl`` and ``evals.jsonl`` are cut back to the
restored step first.
A run that had finished returns its last evaluation without training, evaluating or exporting
again. SIGTERM (preemption) or SIGINT (Ctrl-C) saves a checkpoint and exits with status 143 / 130;
a second one exits at once. A non-finite loss or gradient stops the run with status 1 before
anything of that step is saved; so does a checkpoint save that failed in the background.

Before anything is built or written, every config value is checked (:mod:`altjax.config_checks`)
and the workdir claimed (:mod:`altjax.workdir`: one run at a time, no directory of other files, no
resume under a config that computes another run); a user's mistake is one line and exit status 2.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize()`` first (with
``--coordinator-address``, ``--num-processes`` and ``--process-id`` where JAX cannot find them in
the environment); every process then reads its own rows of each global batch.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from altjax import checkpoint, config_checks, fsutil
from altjax import workdir as workdirs
from altjax.checkpointing import CheckpointSaveFailed, IncompatibleCheckpoint, NoUsableCheckpoint
from altjax.evaluation.datasets import DatasetError
from altjax.stop_signals import EXIT_STATUS, StopSignals

log = logging.getLogger("altjax.train")

SIGTERM_EXIT = EXIT_STATUS[signal.SIGTERM]
SIGINT_EXIT = EXIT_STATUS[signal.SIGINT]
EXPORT_DIR = "model"
# The repository's configs/ (recipes and demos), beside the package in a source checkout.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


# ----- configs -----

def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``get_config()`` of the Python file ``path`` with ``key=value`` overrides applied; raises
    ConfigError for a file that does not give a config or an override that does not fit it."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise config_checks.ConfigError(f"--config {path}: {what}; give a Python file with get_config() "
                                        f"(e.g. {os.path.join(CONFIGS_DIR, 'demo.py')})")
    spec = importlib.util.spec_from_file_location(f"altjax_config_{abs(hash(path))}", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except SyntaxError as e:
        raise config_checks.ConfigError(f"--config {path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's file failed: name it, with its own message
        raise config_checks.ConfigError(f"--config {path}: get_config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise config_checks.ConfigError(f"--config {path}: get_config() returned {type(config).__name__}, not an "
                                        "ml_collections.ConfigDict")
    for item in overrides:
        apply_override(config, item)
    return config


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            # 1e4 is an integer too; 1.5 is not.
            try:
                value = float(text)
            except ValueError:
                raise ValueError("expected an integer") from None
            if not value.is_integer():
                raise ValueError("expected an integer") from None
            return int(value)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError("expected a Python literal tuple, e.g. (1, 2) or ('a', 'b')") from None
        return type(current)(value if isinstance(value, (tuple, list)) else (value,))
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies ``"a.b=value"`` to ``config`` (the key must exist); ConfigError otherwise."""
    key, sep, text = item.partition("=")
    if not sep:
        raise config_checks.ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
    *parents, last = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not hasattr(node, "keys") or part not in node:
            raise config_checks.ConfigError(f"--config.{item}: the config has no {'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if not hasattr(node, "keys") or last not in node:
        raise config_checks.ConfigError(f"--config.{item}: the config has no key {key!r}"
                                        + _suggest(last, list(node.keys()) if hasattr(node, "keys") else []))
    try:
        value = _parse_value(text, node[last])
    except ValueError as e:
        raise config_checks.ConfigError(f"--config.{item}: {e}, got {text!r}") from None
    if isinstance(node, ml_collections.ConfigDict):
        with node.ignore_type():
            node[last] = value
    else:
        node[last] = value


def _suggest(word: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----- building blocks -----

def scenes_tokenizer(directory: str, lang: str = "en"):
    """A BERT WordPiece tokenizer whose vocabulary is the scenes captions' words (and [PAD], [UNK],
    [CLS], [SEP], [MASK]), written to ``directory``: 60-odd tokens instead of BERT's 30,522."""
    from transformers import BertTokenizer

    from altjax.data import scenes

    if lang != "en":
        raise ValueError("the scenes word tokenizer is English; give a tokenizer directory for other languages")
    words = sorted({w.lower() for w in scenes.vocabulary(lang)})
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizer(os.path.join(directory, "vocab.txt"), do_lower_case=True)


def build_processor(config, directory: str):
    """The AlignProcessor of a run, saved to ``directory``: the tokenizer (``config.data.tokenizer``:
    ``"scenes"`` or a tokenizer directory; empty: the one of ``config.model.init_from``) with texts padded to ``config.data.max_length`` by
    default, and ALIGN's evaluation image preprocessing at the model's image size."""
    from altjax.data.preprocess import align_image_config
    from altjax.processing import AlignProcessor

    data = config.data
    if data.tokenizer == "scenes":
        tokenizer = scenes_tokenizer(os.path.join(directory, ".vocab"), data.lang)
    elif data.tokenizer or config.model.init_from:
        tokenizer = config_checks.pretrained_tokenizer(data.tokenizer or config.model.init_from,
                                                       "data.tokenizer" if data.tokenizer else "model.init_from")
    else:
        raise ValueError("config.data.tokenizer is empty: give 'scenes' or a tokenizer directory")
    # Saved with the tokenizer so that AlignProcessor (and altjax-eval) pads to this length.
    tokenizer.init_kwargs["max_length"] = int(data.max_length)
    processor = AlignProcessor(tokenizer, align_image_config(int(config.model.vision.image_size)))
    processor.save_pretrained(directory)
    return AlignProcessor.from_pretrained(directory)


def model_config(config, vocab_size: int):
    """The AlignConfig of ``config.model``: a preset with the ``text``/``vision`` fields and the
    top-level fields replaced (``text.vocab_size`` -1 takes the tokenizer's size)."""
    import dataclasses

    from altjax.models.align import AlignConfig

    base = AlignConfig.from_preset(config.model.preset)
    text = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.text.items()}
    if text.get("vocab_size", -1) == -1:
        text["vocab_size"] = vocab_size
    vision = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.vision.items()}
    return dataclasses.replace(
        base, text_config=dataclasses.replace(base.text_config, **text),
        vision_config=dataclasses.replace(base.vision_config, **vision),
        projection_dim=int(config.model.projection_dim),
        temperature_init_value=float(config.model.temperature_init_value))


def build_source(data, split: str, caption_key: Optional[str] = None):
    """The training/evaluation source of ``config.data`` (see :mod:`altjax.data.sources`);
    ``caption_key`` replaces ``data.caption_key``."""
    from altjax.data import scenes, sources

    kind = data.source
    if kind == "scenes":
        return scenes.source(split, data_dir=data.data_dir or None, lang=data.lang,
                             config=scenes.scenes_config(**data.scenes))
    keys = dict(image_key=data.image_key, caption_key=caption_key or data.caption_key)
    if kind == "tfds":
        return sources.TfdsSource(data.name, split, data_dir=data.data_dir or None, **keys)
    if kind == "webdataset":
        return sources.WebDatasetSource(data.files, **keys)
    if kind == "tfrecord":
        return sources.TFRecordSource(data.files, **keys)
    if kind == "array_record":
        return sources.ArrayRecordSource(data.files, **keys)
    raise ValueError(f"unknown data.source {kind!r}: scenes, tfds, webdataset, tfrecord or array_record")


def build_pipeline(config, tokenizer, mesh):
    """This process's input pipeline: its rows of every global batch, deterministic and resumable."""
    import jax

    from altjax.data import InputPipeline
    from altjax.data.preprocess import ImageTransform, TextField, align_image_config
    from altjax.sharding import process_batch_rows

    rows = process_batch_rows(mesh, int(config.batch_size))
    data = config.data
    image = ImageTransform(align_image_config(int(config.model.vision.image_size)), data.augment or None)
    return InputPipeline(build_source(data, data.split), batch_size=rows.stop - rows.start, image=image,
                         texts=TextField(tokenizer, max_length=int(data.max_length)), seed=int(config.seed),
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         num_threads=data.num_threads or None, prefetch=int(data.prefetch))


# ----- evaluation -----

def evaluation_sets(config) -> dict[str, Any]:
    """``{"<task>/<dataset>/<lang>": dataset}`` for ``config.eval.datasets``. The scenes sets come
    from ``config.data.scenes`` and ``config.data.data_dir`` (the scenes a demo trains on)."""
    from altjax.data import scenes
    from altjax.evaluation import ClassificationSet, RetrievalSet, evaluation_key, load_dataset

    out = {}
    for spec in config.eval.datasets:
        task, name, lang = spec.split("/")
        key = evaluation_key(task, name, lang)
        if name in ("scenes", "altjax_scenes"):
            data = scenes.load_split(config.eval.split, data_dir=config.data.data_dir or None, lang=lang,
                                     config=scenes.scenes_config(**config.data.scenes))
            if task == "zeroshot":
                out[key] = ClassificationSet(name=name, images=data["images"], labels=data["labels"],
                                             class_names=data["class_names"], lang=lang)
            else:
                out[key] = RetrievalSet(name=name, images=data["images"], texts=data["captions"],
                                        text_image_ids=np.arange(len(data["images"])), lang=lang)
        else:
            out[key] = load_dataset(name, task, split=config.eval.split or None, lang=lang,
                                    data_dir=config.data.data_dir or None)
    return out


def evaluate(model, processor, sets: dict[str, Any], *, mesh, batch_size: int, text_length: int) -> dict:
    """Runs every evaluation of ``sets`` on ``model``; ``{key: metrics}`` in percent."""
    from altjax.evaluation import evaluate_retrieval, evaluate_zeroshot

    results = {}
    for key, dataset in sets.items():
        fn = evaluate_zeroshot if key.startswith("zeroshot/") else evaluate_retrieval
        results[key] = fn(model, processor, dataset, mesh=mesh, batch_size=batch_size, text_length=text_length)
    return results


# ----- logs -----

class MetricsLog:
    """A JSON-lines log of records with a ``step`` (``metrics.jsonl``, ``evals.jsonl``): appended
    one line per record; on resume, cut back to a step."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate(self, step: int) -> None:
        """Keeps the records of steps up to ``step``, one per step (the last written: a run
        resumed by an older altjax, or killed between a log line and its checkpoint, may have logged
        a step twice), and drops a half-written last line."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept: dict[Any, str] = {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    kept[record["step"]] = json.dumps(record)
        workdirs.write_text_atomic(self.path, "".join(kept[s] + "\n" for s in sorted(kept)))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (or of ``name``, e.g. ``"evals.jsonl"``)."""
    with open(os.path.join(workdir, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_evals(workdir: str) -> list[dict[str, Any]]:
    """Every evaluation of a run, in step order: ``[{"step": 0, "retrieval/scenes/en": {...}}, ...]``."""
    return read_metrics(workdir, "evals.jsonl")


def _console(line: str) -> None:
    # Clears a progress line being redrawn in place on a terminal before printing.
    sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + line + "\n")
    sys.stderr.flush()


# ----- the loop -----

class _Claim:
    """This run's hold on its workdir: the lock (process 0) and what a fresh run created, removed
    again if the run fails before it has written its record (``config.json``)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.lock = workdirs.RunLock(workdir)
        self.created_workdir = False
        self.committed = False

    def abandon(self) -> None:
        """Undoes what a run that failed before its first record created, then unlocks."""
        lock_created = self.lock.created
        self.lock.release()
        if self.committed:
            return
        if self.created_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif lock_created:
            with contextlib.suppress(OSError):
                os.remove(self.lock.path)


def _agree(error: str) -> str:
    """Process 0's ``error`` (empty: none) on every process, so that all stop together."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return error
    data = np.zeros(4096, np.uint8)
    encoded = error.encode()[:4096]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(data).rstrip(b"\0").decode(errors="replace")


def claim_workdir(config, workdir: str) -> _Claim:
    """Process 0 checks that ``workdir`` is new, empty or altjax's, locks it, and refuses a resume
    under a config that would compute another run (before anything of the workdir changes).
    Raises WorkdirError on every process."""
    import jax

    claim = _Claim(workdir)
    error = ""
    if jax.process_index() == 0:
        try:
            workdirs.check_usable(workdir)
            if not os.path.exists(workdir):
                os.makedirs(workdir)
                claim.created_workdir = True
            claim.lock.acquire()
            # The trained model is exported to WORKDIR/model at the end: refused now, not then, if
            # something other than an earlier export is there.
            try:
                checkpoint.check_replaceable(os.path.join(workdir, EXPORT_DIR))
            except checkpoint.CheckpointError as e:
                raise workdirs.WorkdirError(f"--workdir {workdir}: {e}") from None
            saved = workdirs.read_config(workdir) if workdirs.has_checkpoints(workdir) else None
            if saved is not None:
                blocking, allowed = workdirs.compare_configs(saved, json.loads(config.to_json()))
                if blocking:
                    shown = "; ".join(blocking[:6]) + (f"; and {len(blocking) - 6} more" if len(blocking) > 6 else "")
                    raise workdirs.WorkdirError(
                        f"--workdir {workdir}: its checkpoints were trained under another config ({shown}); "
                        f"resume with the config in {os.path.join(workdir, workdirs.CONFIG_FILE)} or use another "
                        "workdir")
                for change in allowed:
                    log.warning("resuming with a changed setting: %s", change)
            claim.lock.record()
        except workdirs.WorkdirError as e:
            claim.abandon()
            error = str(e)
        except OSError as e:
            claim.abandon()
            error = f"--workdir {workdir}: {e.strerror or e} ({e.filename or workdir})"
    error = _agree(error)
    if error:
        raise workdirs.WorkdirError(error)
    return claim


def _publish(staging: str, target: str) -> None:
    """Puts the directory ``staging`` at ``target``, replacing one an earlier attempt wrote."""
    fresh = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(staging, fresh)
    fsutil.apply_umask(fresh)  # the staging directory is mkdtemp's, private to the owner
    if os.path.isdir(target):
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(fresh, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(fresh, target)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) ``config`` in ``workdir``; returns ``{"step", "metrics", "eval",
    "eval_start"}``: the last step, its logged metrics, the last evaluation and the one before
    training (``config.eval.at_start``, on a fresh run). Raises ConfigError or WorkdirError (a
    user's mistake: nothing was written), TrainingDiverged on a non-finite loss, and
    CheckpointSaveFailed when a save fails; exits the process with :data:`SIGINT_EXIT` /
    :data:`SIGTERM_EXIT` after saving when SIGINT / SIGTERM arrives."""
    for warning in config_checks.validate(config):
        log.warning("%s", warning)
    workdir = os.path.abspath(workdir)
    claim = claim_workdir(config, workdir)
    staging = tempfile.mkdtemp(prefix="altjax-processor-")
    try:
        return _train(config, workdir, claim, staging)
    finally:
        # A run that failed before its first record leaves nothing behind; one that trained
        # (finished, diverged, interrupted) keeps its record for the resume.
        claim.abandon()
        shutil.rmtree(staging, ignore_errors=True)


def _train(config, workdir: str, claim: _Claim, staging: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import multihost_utils

    from altjax import distill, optim, sharding
    from altjax.checkpointing import Checkpointer
    from altjax.evaluation.cli import write_results
    from altjax.models.align import AlignModel
    from altjax.progress import Progress
    from altjax.tensorboard import EventWriter
    from altjax.train_step import (attach_logit_bias, detach_logit_bias, init_state, make_train_step,
                                   objective_from_config)

    primary = jax.process_index() == 0
    total, batch_size, accum = int(config.total_steps), int(config.batch_size), int(config.grad_accum_steps)
    mesh = sharding.make_mesh(**config.mesh)
    processor_dir = os.path.join(workdir, "processor")
    dtype = jnp.dtype(config.model.dtype)
    # The processor is built in a private staging directory and published into the workdir only
    # once the run has been built: a run that fails to build leaves the workdir as it was.
    kind = config.model.get("kind", "align")
    if kind != "align":
        model, processor = distill.build_model(config, staging, mesh)
    elif config.model.init_from:
        processor = build_processor(config, staging)
        model = AlignModel.from_pretrained(config.model.init_from, dtype=dtype, seed=int(config.seed), mesh=mesh)
    else:
        processor = build_processor(config, staging)
        align_config = model_config(config, len(processor.tokenizer))
        model = sharding.sharded_init(
            lambda: AlignModel(align_config, dtype=dtype, rngs=nnx.Rngs(int(config.seed))), mesh)
    model.train()
    sigmoid = config.loss.get("kind", "softmax") == "sigmoid" and config.loss.name != "distill"
    if sigmoid and config.loss.get("learn_bias", True):
        attach_logit_bias(model)
    objective = objective_from_config(config)
    trainable = optim.trainable_filter(config.freeze)
    tx = optim.build(config.optimizer, total, nnx.state(model, trainable))
    graphdef, state = init_state(model, trainable, tx)
    del model
    shardings = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh)
    state = jax.jit(lambda s: s, out_shardings=shardings)(state)
    step_fn = make_train_step(graphdef, objective, tx, mesh=mesh, accum_steps=accum,
                              learning_rate=optim.schedule(config.optimizer, total), state_shardings=shardings,
                              batch_sharding=sharding.batch_sharding(mesh))
    if kind == "align":
        pipeline = build_pipeline(config, processor.tokenizer, mesh)
    else:
        pipeline = distill.build_pipeline(config, processor, staging, mesh)
    sets = evaluation_sets(config) if config.eval_every or config.eval.at_end or config.eval.at_start else {}

    checkpointer = Checkpointer(os.path.join(workdir, workdirs.CHECKPOINTS_DIR), state,
                                keep=int(config.keep_checkpoints), asynchronous=bool(config.async_checkpoints))
    unwrap = (lambda m: m) if kind == "align" else distill.exported
    exported = lambda m: detach_logit_bias(unwrap(m))  # noqa: E731
    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), primary)
    eval_log = MetricsLog(os.path.join(workdir, "evals.jsonl"), primary)
    writer = None
    progress = None
    checkpoint_closed = False
    try:
        step = 0
        restored = checkpointer.restore_latest()
        if restored is not None:
            step, state, data_states = restored
            pipeline.set_state(data_states[jax.process_index()])
            _console(f"resumed from {checkpointer.directory}/{step}")
        # The run is built and its checkpoint (if any) fits: now its record is written.
        if primary:
            workdirs.write_text_atomic(os.path.join(workdir, workdirs.CONFIG_FILE),
                                       config.to_json(indent=2, sort_keys=True) + "\n")
            _publish(staging, processor_dir)
        claim.committed = True
        metrics_log.truncate(step)
        eval_log.truncate(step)
        # purge_step: TensorBoard drops events a previous attempt logged after the restored step.
        writer = EventWriter(workdir, purge_step=step + 1 if restored else None) if primary else None

        def run_eval(at: int) -> dict:
            model = exported(nnx.merge(graphdef, state["params"], state["frozen"], state["rest"]))
            results = evaluate(model, processor, sets, mesh=mesh, batch_size=int(config.eval.batch_size),
                               text_length=int(config.data.max_length))
            if primary:
                write_results(os.path.join(workdir, "eval_results.json"), results)
                eval_log.write({"step": at, **results})
                for key, values in results.items():
                    for name, value in values.items():
                        writer.add_scalar(f"eval/{key}/{name}", value, at)
                writer.flush()
                _console(f"step {at}: " + ", ".join(f"{k} {_headline(v)}" for k, v in results.items()))
            return results

        def data_states() -> list[dict]:
            mine = pipeline.get_state()
            rows = multihost_utils.process_allgather(np.asarray([mine["epoch"], mine["position"], mine["skipped"]]))
            rows = np.asarray(rows).reshape(-1, 3)
            return [{**mine, "process_index": i, "epoch": int(r[0]), "position": int(r[1]), "skipped": int(r[2])}
                    for i, r in enumerate(rows)]

        def acknowledge(signum: int) -> None:
            _console(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again "
                     "to exit at once without saving)")

        def abandon(signum: int) -> None:
            steps = checkpointer.steps()
            _console(f"{signal.Signals(signum).name} again: exiting without saving; the last checkpoint is "
                     f"{steps[-1] if steps else 'none'} in {checkpointer.directory}")
            # Orbax's writer threads fail noisily as their directory disappears under them; the
            # process is ending, so what they print would only bury the line above.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
            checkpointer.remove_temporary()

        chance = objective.chance(batch_size) if objective.chance is not None else None
        chance_watch = ChanceWatch(chance, int(config.get("warn_chance_steps", 0)),
                                   int(config.optimizer.warmup_steps))
        eval_results, eval_start = {}, {}
        with StopSignals(acknowledge, abandon) as stop:

            def stop_now(at: int) -> None:
                """Saves ``at`` (unless it is saved already) and exits with the signal's status."""
                if at > start_step and at not in checkpointer.steps():
                    checkpointer.save(at, state, data_states())
                checkpointer.wait()
                name = signal.Signals(stop.requested).name
                if at > start_step:
                    _console(f"{name}: saved step {at} to {checkpointer.directory}; exiting")
                else:
                    _console(f"{name}: nothing trained since step {at}; exiting")
                sys.exit(EXIT_STATUS[stop.requested])

            start_step = step
            if config.eval.at_start and sets and step == 0:
                eval_start = run_eval(0)
            progress = Progress(total, "training", unit="steps")
            progress.count = step
            last, last_time, last_metrics = step, time.perf_counter(), {}
            while step < total:
                if stop.requested and jax.process_count() == 1:
                    stop_now(step)
                batch = sharding.shard_batch(next(pipeline), mesh)
                state, metrics = step_fn(state, batch)
                step += 1
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm")):
                    raise TrainingDiverged(
                        f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}, update norm "
                        f"{metrics['update_norm']}: training diverged; nothing of this step was saved, the last good "
                        f"checkpoint is {checkpointer.steps()[-1] if checkpointer.steps() else 'none'} in "
                        f"{checkpointer.directory}")
                # A save that failed in the background stops the run now, not one interval later.
                checkpointer.check()
                progress.update(1)
                if jax.process_count() > 1:
                    # Every process must stop at the same step: a signal may reach them at different steps.
                    signals = np.asarray(multihost_utils.process_allgather(np.asarray(stop.requested or 0)))
                    if signals.any() and not stop.requested:
                        stop.request(int(signals[signals > 0][0]))
                warning = chance_watch.update(step, metrics["loss"])
                if warning and primary:
                    log.warning("%s", warning)
                if step % int(config.log_every) == 0 or step == total:
                    now = time.perf_counter()
                    skipped = sum(s["skipped"] for s in data_states())
                    last_metrics = {"step": step, **metrics,
                                    "examples_per_sec": (step - last) * batch_size / (now - last_time),
                                    "skipped_examples": skipped, "epoch": pipeline.epoch}
                    last, last_time = step, now
                    metrics_log.write(last_metrics)
                    if writer is not None:
                        for name, value in last_metrics.items():
                            if name != "step":
                                writer.add_scalar(f"train/{name}", value, step)
                        writer.flush()
                    # The objective's own headline: the contrastive temperature, or phase 1's cosine.
                    extra = "".join(f"{name} {metrics[name]:.4f}, " for name in ("temperature", "logit_bias", "cosine")
                                    if name in metrics)
                    _console(f"step {step}/{total}: loss {metrics['loss']:.4f}, lr {metrics['learning_rate']:.3g}, "
                             f"{extra}{last_metrics['examples_per_sec']:.1f} examples/s, skipped {skipped}")
                if step % int(config.checkpoint_every) == 0 or step == total:
                    checkpointer.save(step, state, data_states())
                if stop.requested:
                    stop_now(step)
                if config.eval_every and step % int(config.eval_every) == 0 and step < total:
                    eval_results = run_eval(step)
            export = os.path.join(workdir, EXPORT_DIR)
            # A run that had finished before is not evaluated or exported again (a notebook or script
            # re-running it gets its results at no cost).
            done_before = restored is not None and restored[0] >= total
            previous_evals = [r for r in read_metrics(workdir, "evals.jsonl") if r["step"] == step] \
                if done_before and os.path.exists(eval_log.path) else []
            if previous_evals:
                eval_results = {k: v for k, v in previous_evals[-1].items() if k != "step"}
            elif config.eval.at_end and sets:
                eval_results = run_eval(step)
            checkpointer.wait()
            if not (done_before and os.path.isdir(export)):
                model = exported(nnx.merge(graphdef, state["params"], state["frozen"], state["rest"]))
                model.eval()
                model.name_or_path = processor_dir
                model.save_pretrained(export, overwrite=True)
            checkpointer.close()
            checkpoint_closed = True
    finally:
        if progress is not None:
            progress.close()
        pipeline.close()
        if not checkpoint_closed:
            # Already leaving with an error: a failed background save must not hide it.
            with contextlib.suppress(Exception):
                checkpointer.close()
        if writer is not None:
            writer.close()
    return {"step": step, "metrics": last_metrics, "eval": eval_results, "eval_start": eval_start}


class ChanceWatch:
    """Warns once when the loss has stayed at chance level (within 2%: the model has learned
    nothing) for ``patience`` consecutive steps after the ``warmup`` steps; ``chance`` None or
    ``patience`` 0 turns it off. Such a run can look alive, its temperature moving, while it only
    spreads its predictions evenly."""

    def __init__(self, chance: Optional[float], patience: int, warmup: int):
        self.chance, self.patience, self.warmup = chance, patience, warmup
        self.since: Optional[int] = None
        self.warned = False

    def update(self, step: int, loss: float) -> Optional[str]:
        if self.chance is None or not self.patience or self.warned or step <= self.warmup:
            return None
        if loss < 0.98 * self.chance:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if step - self.since + 1 < self.patience:
            return None
        self.warned = True
        return (f"step {step}: the loss has stayed at chance level ({self.chance:.4f} for this batch) for "
                f"{self.patience} steps since step {self.since}: the model is not learning; check the data (images "
                "matched to their captions?), the learning rate and the temperature")


def _headline(metrics: dict[str, float]) -> str:
    if "top1" in metrics:
        return f"top1 {metrics['top1']:.1f}%"
    return f"R@1 t2i {metrics['t2i_r1']:.1f}% i2t {metrics['i2t_r1']:.1f}%"


# ----- command line -----

# Errors a command reports in one line: a user's mistake (exit status 2), or a run that cannot go on
# (1). Anything else is altjax's own bug and keeps its traceback.
USER_ERRORS = (config_checks.ConfigError, workdirs.WorkdirError, IncompatibleCheckpoint, checkpoint.CheckpointError,
               DatasetError)
RUN_FAILURES = (TrainingDiverged, NoUsableCheckpoint, CheckpointSaveFailed)


# Storage that fails under a run (full, over quota, read-only) is not altjax's bug: one line too.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def report(prog: str, error: Exception) -> int:
    """Prints ``prog: error: ...`` for one of :data:`USER_ERRORS` / :data:`RUN_FAILURES` and
    returns its exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, USER_ERRORS) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``altjax-train --config FILE --workdir DIR [--config.key=value ...] [--distributed ...]``;
    returns the exit status (0 done, 1 diverged, a failed save or no usable checkpoint, 2 a user's
    mistake, 130 / 143 stopped by SIGINT / SIGTERM after saving)."""
    parser = argparse.ArgumentParser(
        prog="altjax-train", description="Train an ALIGN dual encoder (resumes from DIR's checkpoints).",
        epilog="Any --config.KEY=VALUE overrides a config entry, e.g. --config.total_steps=100.")
    parser.add_argument("--config", required=True, help="a Python file with get_config()")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs, metrics and the final model")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host TPU pods, GPU clusters); on "
                             "Cloud TPU, SLURM, Open MPI and Kubernetes it finds the other processes itself")
    parser.add_argument("--coordinator-address", help="with --distributed elsewhere: host:port of process 0")
    parser.add_argument("--num-processes", type=int, help="with --distributed elsewhere: the number of processes")
    parser.add_argument("--process-id", type=int, help="with --distributed elsewhere: this process's index")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    rest = list(rest)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides are --config.KEY=VALUE)")
        item = item[len("--config."):]
        if "=" not in item and rest and not rest[0].startswith("--"):
            item = f"{item}={rest.pop(0)}"  # --config.KEY VALUE
        overrides.append(item)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides)
        if args.distributed:
            import jax

            try:
                jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                           num_processes=args.num_processes, process_id=args.process_id)
            except (ValueError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise config_checks.ConfigError(
                    f"--distributed: {first}; outside Cloud TPU, SLURM, Open MPI and Kubernetes give "
                    "--coordinator-address, --num-processes and --process-id") from None
        train(config, args.workdir)
    except USER_ERRORS + RUN_FAILURES as e:
        return report("altjax-train", e)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"altjax-train: error: {e.filename or args.workdir}: {e.strerror}; the run stopped; free space or fix "
              "the storage, then run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
