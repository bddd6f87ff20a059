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
again. SIGTERM (preemption) saves a checkpoint and exits with status 143. A non-finite loss or gradient
stops the run with status 1 before anything of that step is saved.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize()`` first (with
``--coordinator-address``, ``--num-processes`` and ``--process-id`` where JAX cannot find them in
the environment); every process then reads its own rows of each global batch.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

log = logging.getLogger("altjax.train")

SIGTERM_EXIT = 128 + signal.SIGTERM
# The repository's configs/ (recipes and demos), beside the package in a source checkout.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


# ----- configs -----

def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``get_config()`` of the Python file ``path`` with ``key=value`` overrides applied."""
    spec = importlib.util.spec_from_file_location(f"altjax_config_{abs(hash(path))}", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        apply_override(config, item)
    return config


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text)
        return type(current)(value if isinstance(value, (tuple, list)) else (value,))
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies ``"a.b=value"`` to ``config`` (the key must exist)."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} is not key=value")
    *parents, last = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise KeyError(f"override {item!r}: the config has no {part!r}")
        node = node[part]
    if last not in node:
        raise KeyError(f"override {item!r}: the config has no key {key!r}")
    with node.ignore_type():
        node[last] = _parse_value(text, node[last])


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
    from transformers import AutoTokenizer

    from altjax.data.preprocess import align_image_config
    from altjax.processing import AlignProcessor

    data = config.data
    if data.tokenizer == "scenes":
        tokenizer = scenes_tokenizer(os.path.join(directory, ".vocab"), data.lang)
    elif data.tokenizer or config.model.init_from:
        tokenizer = AutoTokenizer.from_pretrained(data.tokenizer or config.model.init_from)
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
        """Keeps the lines of steps up to ``step`` (and drops a half-written last line)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", math.inf) <= step:
                    kept.append(json.dumps(record))
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

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

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) ``config`` in ``workdir``; returns ``{"step", "metrics", "eval",
    "eval_start"}``: the last step, its logged metrics, the last evaluation and the one before
    training (``config.eval.at_start``, on a fresh run). Raises TrainingDiverged on a non-finite
    loss; exits the process with :data:`SIGTERM_EXIT` after saving when SIGTERM arrives."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import multihost_utils

    from altjax import optim, sharding
    from altjax.checkpointing import Checkpointer
    from altjax.evaluation.cli import write_results
    from altjax.models.align import AlignModel
    from altjax.progress import Progress
    from altjax.tensorboard import EventWriter
    from altjax.train_step import (attach_logit_bias, detach_logit_bias, init_state, make_train_step,
                                   objective_from_config)

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    total, batch_size, accum = int(config.total_steps), int(config.batch_size), int(config.grad_accum_steps)
    mesh = sharding.make_mesh(**config.mesh)
    if batch_size % (sharding.batch_size_divisor(mesh) * accum):
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {sharding.batch_size_divisor(mesh)} "
                         f"data-parallel devices times grad_accum_steps {accum}")
    if primary:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2, sort_keys=True) + "\n")

    processor_dir = os.path.join(workdir, "processor")
    dtype = jnp.dtype(config.model.dtype)
    # CLIP and AltCLIP's two phases (altjax.distill) build their own model, processor and pipeline.
    kind = config.model.get("kind", "align")
    if kind != "align":
        from altjax import distill

        model, processor = distill.build_model(config, processor_dir, mesh)
    elif config.model.init_from:
        processor = build_processor(config, processor_dir)
        model = AlignModel.from_pretrained(config.model.init_from, dtype=dtype, seed=int(config.seed), mesh=mesh)
    else:
        processor = build_processor(config, processor_dir)
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

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), state,
                                keep=int(config.keep_checkpoints), asynchronous=bool(config.async_checkpoints))
    if kind == "align":
        pipeline = build_pipeline(config, processor.tokenizer, mesh)
    else:
        pipeline = distill.build_pipeline(config, processor, processor_dir, mesh)
    unwrap = (lambda m: m) if kind == "align" else distill.exported
    exported = lambda m: detach_logit_bias(unwrap(m))  # noqa: E731
    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), primary)
    eval_log = MetricsLog(os.path.join(workdir, "evals.jsonl"), primary)
    step = 0
    restored = checkpointer.restore_latest()
    if restored is not None:
        step, state, data_states = restored
        pipeline.set_state(data_states[jax.process_index()])
        _console(f"resumed from {checkpointer.directory}/{step}")
    metrics_log.truncate(step)
    eval_log.truncate(step)

    # purge_step: TensorBoard drops events a previous attempt logged after the restored step.
    writer = EventWriter(workdir, purge_step=step + 1 if restored else None) if primary else None
    sets = evaluation_sets(config) if config.eval_every or config.eval.at_end or config.eval.at_start else {}

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

    terminated = []
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True)) if _main_thread() else None
    eval_results, eval_start = {}, {}
    progress = None
    try:
        if config.eval.at_start and sets and step == 0:
            eval_start = run_eval(0)
        progress = Progress(total, "training", unit="steps")
        progress.count = step
        last, last_time, last_metrics = step, time.perf_counter(), {}
        while step < total:
            batch = sharding.shard_batch(next(pipeline), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm")):
                raise TrainingDiverged(
                    f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}, update norm "
                    f"{metrics['update_norm']}: training diverged; nothing of this step was saved, the last good checkpoint is "
                    f"{checkpointer.steps()[-1] if checkpointer.steps() else 'none'} in {checkpointer.directory}")
            progress.update(1)
            if jax.process_count() > 1:
                # Every process must save the same step: SIGTERM may reach them at different steps.
                if np.any(multihost_utils.process_allgather(np.asarray(bool(terminated)))) and not terminated:
                    terminated.append(True)
            if step % int(config.log_every) == 0 or step == total:
                now = time.perf_counter()
                skipped = sum(s["skipped"] for s in data_states())
                last_metrics = {"step": step, **metrics, "examples_per_sec": (step - last) * batch_size / (now - last_time),
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
            if step % int(config.checkpoint_every) == 0 or step == total or terminated:
                checkpointer.save(step, state, data_states())
            if terminated:
                checkpointer.wait()
                _console(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting")
                sys.exit(SIGTERM_EXIT)
            if config.eval_every and step % int(config.eval_every) == 0 and step < total:
                eval_results = run_eval(step)
        export = os.path.join(workdir, "model")
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
    finally:
        if progress is not None:
            progress.close()
        pipeline.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {"step": step, "metrics": last_metrics, "eval": eval_results, "eval_start": eval_start}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _headline(metrics: dict[str, float]) -> str:
    if "top1" in metrics:
        return f"top1 {metrics['top1']:.1f}%"
    return f"R@1 t2i {metrics['t2i_r1']:.1f}% i2t {metrics['i2t_r1']:.1f}%"


# ----- command line -----

def main(argv: Optional[Sequence[str]] = None) -> int:
    """``altjax-train --config FILE --workdir DIR [--config.key=value ...] [--distributed ...]``;
    returns the exit status (0 done, 1 diverged or no usable checkpoint, 2 bad arguments)."""
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
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides are --config.KEY=VALUE)")
        overrides.append(item[len("--config."):])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides)
    except (FileNotFoundError, KeyError, ValueError, SyntaxError) as e:
        print(f"altjax-train: {e}", file=sys.stderr)
        return 2
    if args.distributed:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from altjax.checkpointing import IncompatibleCheckpoint, NoUsableCheckpoint

    try:
        train(config, args.workdir)
    except (TrainingDiverged, IncompatibleCheckpoint, NoUsableCheckpoint) as e:
        print(f"altjax-train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
