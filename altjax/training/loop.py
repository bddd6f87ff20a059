"""The training loop: :func:`train` runs (or resumes) the task of a config in a workdir.

The loop knows no model: the task that ``config.task`` names (:mod:`altjax.training.tasks`)
builds the model, its processor and its input pipeline, gives the objective and says what is
exported; the loop adds what every run has (freezing, the SigLIP bias an objective asks for, the
sharded train state, checkpoints, logs, evaluations, signals).

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

Before anything is built or written, every config value is checked (:mod:`altjax.training.config`)
and the workdir claimed (:mod:`altjax.workdir`: one run at a time, no directory of other files, no
resume under a config that computes another run); a user's mistake is one error and nothing written.
The workdir may be a local path or an object-store path (``gs://...``, where its filesystem library
is installed): everything in it is written through :mod:`altjax.fsutil` / etils ``epath``, the
checkpoints by orbax.

On several hosts every process runs :func:`train` and loads its own rows of each global batch.
The run does not depend on the topology: every global batch holds the same examples in the same
rows (:mod:`altjax.data.order`, :func:`~altjax.training.step.process_batch_positions`), random
draws follow the row, and the input position in a checkpoint is global; so the losses of 1 x 8,
2 x 4 or 1 x 4 (processes x devices) differ by float32 reduction order only, and a checkpoint
resumes on any topology with the same global batch (its arrays restored straight into the new
shardings). A process that dies or fails alone ends the others within ``peer_timeout_s``
(:mod:`altjax.training.peers`); only process 0 writes the logs and the exported model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from altjax import fsutil, sharding
from altjax import workdir as workdirs
from altjax.console import Progress, echo
from altjax.data import scenes
from altjax.evaluation import (ClassificationSet, RetrievalSet, SkippedImages, evaluate_retrieval, evaluate_zeroshot,
                               evaluated_counts, evaluation_key)
from altjax.evaluation import load_dataset
from altjax.evaluation.datasets import DatasetError
from altjax.evaluation.results import write_results
from altjax.model_io import directories
from altjax.model_io.directories import CheckpointError
from altjax.models import stack
from altjax.stop_signals import EXIT_STATUS, StopSignals
from altjax.tensorboard import EventWriter
from altjax.training import compile_cache, optim, peers, tasks
from altjax.training.checkpoints import Checkpointer, IncompatibleCheckpoint, NoUsableCheckpoint
from altjax.training.checks import ConfigError
from altjax.training.config import validate
from altjax.training.logs import MetricsLog, read_metrics
from altjax.training.objectives import attach_logit_bias, detach_logit_bias
from altjax.training.profiler import StepProfiler
from altjax.training.step import init_state, make_train_step, process_batch_positions

log = logging.getLogger("altjax.train")

SIGTERM_EXIT = EXIT_STATUS[signal.SIGTERM]
SIGINT_EXIT = EXIT_STATUS[signal.SIGINT]
EXPORT_DIR = "model"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


# Failures that every process of a run meets at once (they check the same config, workdir and
# checkpoint, and compute the same loss): such a process leaves without waiting on its peers.
AGREED_FAILURES = (ConfigError, workdirs.WorkdirError, IncompatibleCheckpoint, NoUsableCheckpoint, CheckpointError,
                   DatasetError, TrainingDiverged)


# ----- evaluation -----

def evaluation_sets(config) -> dict[str, Any]:
    """``{"<task>/<dataset>/<lang>": dataset}`` for ``config.eval.datasets``. The scenes sets come
    from ``config.data.scenes`` and ``config.data.data_dir`` (the scenes a demo trains on)."""
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
    """Runs every evaluation of ``sets`` on ``model``; ``{key: metrics}`` in percent, with the counts
    evaluated (:func:`~altjax.evaluation.evaluated_counts`). Images that
    cannot be read are left out, as altjax-eval does: a warning names them and the metrics of that
    evaluation gain ``skipped_images`` (their count), so a damaged evaluation set cannot pass for
    an intact one."""
    results = {}
    for key, dataset in sets.items():
        fn = evaluate_zeroshot if key.startswith("zeroshot/") else evaluate_retrieval
        skipped = SkippedImages()
        results[key] = fn(model, processor, dataset, mesh=mesh, batch_size=batch_size, text_length=text_length,
                          skipped=skipped)
        results[key].update(evaluated_counts(dataset, skipped))
        if skipped.count:
            log.warning("%s: skipped %d of %d images that cannot be read: %s", key, skipped.count,
                        len(dataset.images), "; ".join(skipped.examples))
            results[key]["skipped_images"] = float(skipped.count)
    return results


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
        elif lock_created and not fsutil.is_remote(self.lock.path):  # a remote lock deletes itself on release
            with contextlib.suppress(OSError):
                os.remove(self.lock.path)


def _agree(error: str) -> str:
    """Process 0's ``error`` (empty: none) on every process, so that all stop together."""
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
    claim = _Claim(workdir)
    error = ""
    if jax.process_index() == 0:
        try:
            workdirs.check_usable(workdir)
            # A store has no directories to create: a remote workdir exists once its lock is written.
            if not fsutil.is_remote(workdir) and not os.path.exists(workdir):
                os.makedirs(workdir)
                claim.created_workdir = True
            claim.lock.acquire()
            # The trained model is exported to WORKDIR/model at the end: refused now, not then, if
            # something other than an earlier export is there.
            try:
                directories.check_replaceable(os.path.join(workdir, EXPORT_DIR))
            except directories.CheckpointError as e:
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
    if fsutil.is_remote(target):
        fsutil.publish_remote_dir(staging, target)
        return
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
    "eval_start", "model"}``: the last step, its logged metrics, the last evaluation, the one before
    training (``config.eval.at_start``, on a fresh run) and the exported model's directory
    (``workdir/model``). Raises ConfigError or WorkdirError (a user's mistake: nothing was
    written), TrainingDiverged on a non-finite loss, and
    CheckpointSaveFailed when a save fails; exits the process with :data:`SIGINT_EXIT` /
    :data:`SIGTERM_EXIT` after saving when SIGINT / SIGTERM arrives."""
    workdir = workdirs.absolute(workdir)
    # The processes wait for each other from the start: a dead one ends the others within
    # peer_timeout_s, and even a config mistake is left in step (altjax.training.peers).
    with peers.PeerWatch(_peer_timeout(config), lambda: _resume_hint(workdir), agreed=AGREED_FAILURES):
        for warning in validate(config):
            log.warning("%s", warning)
        claim = claim_workdir(config, workdir)
        staging = tempfile.mkdtemp(prefix="altjax-processor-")
        try:
            return _train(config, workdir, claim, staging)
        finally:
            # A run that failed before its first record leaves nothing behind; one that trained
            # (finished, diverged, interrupted) keeps its record for the resume.
            claim.abandon()
            shutil.rmtree(staging, ignore_errors=True)


def _peer_timeout(config) -> float:
    """``config.peer_timeout_s`` before the config is checked: a value the check will refuse
    watches for the time it takes to refuse it."""
    value = config.get("peer_timeout_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 30.0


def _resume_hint(workdir: str) -> str:
    """Where a stopped run resumes from, for the line that reports a lost peer."""
    steps = Checkpointer.finished_steps(os.path.join(workdir, workdirs.CHECKPOINTS_DIR))
    where = f"the last complete checkpoint is step {steps[-1]}" if steps else "no checkpoint was written yet"
    return f"{where} in {workdir}; run the same command on every process to resume"


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What a run is built from besides its train state: the model's ``graphdef``, the optimiser
    ``tx``, the ``objective`` and the ``processor`` (saved in the build directory)."""

    graphdef: Any
    tx: Any
    objective: Any
    processor: Any


def build_run(config, directory: str, mesh) -> tuple[RunParts, dict]:
    """``(parts, state)`` of a fresh run of ``config``: the task's model in training mode, with the
    SigLIP bias its objective asks for, split into the unsharded train state
    (:func:`~altjax.training.step.init_state`). Under ``jax.eval_shape`` nothing is computed:
    ``altjax-train --dry-run`` (:mod:`altjax.training.plan`) takes the state's shapes this way, so
    that the step it compiles is the one a run trains."""
    task = tasks.TASKS[config.task]
    model, processor = task.build(config, directory, mesh)
    model.train()
    stack.set_remat(model, config.remat_policy if config.remat else None)
    objective = task.objective(config)
    if objective.logit_bias is not None:
        attach_logit_bias(model, objective.logit_bias)
    trainable = optim.trainable_filter(config.freeze)
    tx = optim.build(config.optimizer, int(config.total_steps), nnx.state(model, trainable))
    graphdef, state = init_state(model, trainable, tx)
    return RunParts(graphdef, tx, objective, processor), state


def build_step(config, parts: RunParts, mesh, shardings):
    """The jitted train step of a run; ``shardings``: the train state's, in and out."""
    return make_train_step(parts.graphdef, parts.objective, parts.tx, mesh=mesh,
                           accum_steps=int(config.grad_accum_steps),
                           learning_rate=optim.schedule(config.optimizer, int(config.total_steps)),
                           state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))


def _train(config, workdir: str, claim: _Claim, staging: str) -> dict[str, Any]:
    compile_cache.enable(config.compilation_cache_dir)
    task = tasks.TASKS[config.task]
    primary = jax.process_index() == 0
    total, batch_size = int(config.total_steps), int(config.batch_size)
    mesh = sharding.make_mesh(**config.mesh)
    processor_dir = os.path.join(workdir, "processor")
    # The processor is built in a private staging directory and published into the workdir only
    # once the run has been built: a run that fails to build leaves the workdir as it was.
    parts, state = build_run(config, staging, mesh)
    graphdef, objective, processor = parts.graphdef, parts.objective, parts.processor
    shardings = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh)
    state = jax.jit(lambda s: s, out_shardings=shardings)(state)
    step_fn = build_step(config, parts, mesh, shardings)
    pipeline = task.pipeline(config, processor, staging,
                             process_batch_positions(mesh, batch_size, int(config.grad_accum_steps)))
    sets = evaluation_sets(config) if config.eval_every or config.eval.at_end or config.eval.at_start else {}

    checkpointer = Checkpointer(os.path.join(workdir, workdirs.CHECKPOINTS_DIR), state,
                                keep=int(config.keep_checkpoints), asynchronous=bool(config.async_checkpoints))

    def exported(state) -> nnx.Module:
        """What the run evaluates and saves: the task's export, without a bias the run attached."""
        return task.export(detach_logit_bias(nnx.merge(graphdef, state["params"], state["frozen"], state["rest"])))

    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), primary)
    eval_log = MetricsLog(os.path.join(workdir, "evals.jsonl"), primary)
    writer = None
    progress = None
    profiler = StepProfiler.from_config(config, workdir)
    checkpoint_closed = False
    try:
        step = 0
        restored = checkpointer.restore_latest()
        if restored is not None:
            step, state, saved_data = restored
            pipeline.set_state(resume_data_state(saved_data, pipeline.get_state(), batch_size,
                                                 checkpointer.directory, step))
            if primary:
                echo(f"resumed from {checkpointer.directory}/{step}")
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
            model = exported(state)
            results = evaluate(model, processor, sets, mesh=mesh, batch_size=int(config.eval.batch_size),
                               text_length=int(config.data.max_length))
            if primary:
                write_results(os.path.join(workdir, "eval_results.json"), results)
                eval_log.write({"step": at, **results})
                for key, values in results.items():
                    for name, value in values.items():
                        writer.add_scalar(f"eval/{key}/{name}", value, at)
                writer.flush()
                echo(f"step {at}: " + ", ".join(f"{k} {_headline(v)}" for k, v in results.items()))
            return results

        def data_state() -> dict:
            """The input position, global: every process is at the same place in the global
            order; ``skipped`` counts the records all of them skipped."""
            mine = pipeline.get_state()
            if jax.process_count() == 1:
                return mine
            rows = multihost_utils.process_allgather(np.asarray([mine["epoch"], mine["batch"], mine["skipped"]]))
            rows = np.asarray(rows).reshape(-1, 3)
            if (rows[:, :2] != rows[0, :2]).any():
                raise RuntimeError(f"the processes' input pipelines are at different places (epoch, batch): "
                                   f"{rows[:, :2].tolist()}")
            return {**mine, "skipped": int(rows[:, 2].sum())}

        def acknowledge(signum: int) -> None:
            echo(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again "
                 "to exit at once without saving)")

        def abandon(signum: int) -> None:
            steps = checkpointer.steps()
            echo(f"{signal.Signals(signum).name} again: exiting without saving; the last checkpoint is "
                 f"{steps[-1] if steps else 'none'} in {checkpointer.directory}")
            # Orbax's writer threads fail noisily as their directory disappears under them; the
            # process is ending, so what they print would only bury the line above.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
            checkpointer.remove_temporary()

        chance = objective.chance(batch_size) if objective.chance is not None else None
        chance_watch = ChanceWatch(chance, int(config.warn_chance_steps),
                                   int(config.optimizer.warmup_steps))
        eval_results, eval_start = {}, {}
        with StopSignals(acknowledge, abandon) as stop:

            def stop_now(at: int) -> None:
                """Saves ``at`` (unless it is saved already) and exits with the signal's status."""
                if at > start_step and at not in checkpointer.steps():
                    checkpointer.save(at, state, data_state())
                checkpointer.wait()
                name = signal.Signals(stop.requested).name
                if at > start_step:
                    echo(f"{name}: saved step {at} to {checkpointer.directory}; exiting")
                else:
                    echo(f"{name}: nothing trained since step {at}; exiting")
                sys.exit(EXIT_STATUS[stop.requested])

            start_step = step
            if config.eval.at_start and sets and step == 0:
                eval_start = run_eval(0)
            # The bar is process 0's, as the files are (Progress); a finished run has none, and a
            # resumed one counts the steps before it toward the total but not toward the rate.
            if step < total:
                progress = Progress(total, "training", unit="steps", initial=step)
            last, last_time, last_metrics = step, time.perf_counter(), {}
            while step < total:
                if stop.requested and jax.process_count() == 1:
                    stop_now(step)
                profiler.before_step(step + 1)
                batch = sharding.shard_batch(next(pipeline), mesh)
                state, metrics = step_fn(state, batch)
                step += 1
                profiler.after_step(step, state)
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
                    skipped = data_state()["skipped"]
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
                    if primary:
                        echo(f"step {step}/{total}: loss {metrics['loss']:.4f}, lr {metrics['learning_rate']:.3g}, "
                             f"{extra}{last_metrics['examples_per_sec']:.1f} examples/s, skipped {skipped}")
                if step % int(config.checkpoint_every) == 0 or step == total:
                    checkpointer.save(step, state, data_state())
                if stop.requested:
                    stop_now(step)
                if config.eval_every and step % int(config.eval_every) == 0 and step < total:
                    eval_results = run_eval(step)
            export = os.path.join(workdir, EXPORT_DIR)
            # A run that had finished before is not evaluated or exported again (a notebook or script
            # re-running it gets its results at no cost).
            done_before = restored is not None and restored[0] >= total
            previous_evals = [r for r in read_metrics(workdir, "evals.jsonl") if r["step"] == step] \
                if done_before and epath.Path(eval_log.path).exists() else []
            if previous_evals:
                eval_results = {k: v for k, v in previous_evals[-1].items() if k != "step"}
            elif config.eval.at_end and sets:
                eval_results = run_eval(step)
            checkpointer.wait()
            if not (done_before and epath.Path(export).is_dir()):
                model = exported(state)
                model.eval()
                model.name_or_path = processor_dir
                if jax.process_count() > 1:
                    # Every process takes part in gathering the sharded weights; process 0 writes them.
                    values = nnx.state(model, nnx.Not(nnx.RngState))
                    nnx.update(model, multihost_utils.process_allgather(values, tiled=True))
                if primary:
                    model.save_pretrained(export, overwrite=True)
                multihost_utils.sync_global_devices("altjax export written")
            checkpointer.close()
            checkpoint_closed = True
    finally:
        profiler.close()
        if progress is not None:
            progress.close()
        pipeline.close()
        if not checkpoint_closed:
            # Already leaving with an error: a failed background save must not hide it.
            with contextlib.suppress(Exception):
                checkpointer.close()
        if writer is not None:
            writer.close()
    return {"step": step, "metrics": last_metrics, "eval": eval_results, "eval_start": eval_start,
            "model": os.path.join(workdir, EXPORT_DIR)}


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


def resume_data_state(saved, current: dict, batch_size: int, directory: str, step: int) -> dict:
    """The state this process's input pipeline continues from, of the data state a checkpoint
    holds (``saved``) and the pipeline's own (``current``). Positions are global, so any topology
    continues the same sequence; the skipped records counted before are carried by process 0 alone,
    so that the sum over processes goes on from the checkpoint's total. A checkpoint of an altjax
    whose position was per process (a list of states) continues at the same epoch and global batch,
    with a warning: the order of examples after it differs from what that version would have read."""
    if isinstance(saved, list):
        first = saved[0]
        per_process = batch_size // int(first.get("process_count", len(saved)))
        saved = {**current, "epoch": int(first["epoch"]), "batch": int(first["position"]) // max(per_process, 1),
                 "skipped": sum(int(s.get("skipped", 0)) for s in saved)}
        log.warning("checkpoint %s/%d was written by an earlier altjax whose input position was per process; "
                    "continuing at epoch %d, batch %d of the global order (the examples from here on differ from "
                    "what that version would have read)", directory, step, saved["epoch"], saved["batch"])
    for key in ("seed", "batch_size", "num_records"):
        if key in saved and key in current and int(saved[key]) != int(current[key]):
            raise IncompatibleCheckpoint(
                f"checkpoint {directory}/{step} was written reading data with {key}={saved[key]}, this run has "
                f"{key}={current[key]}: it would not continue the same sequence of examples; resume with the data "
                "and batch size it was written with, or start a new workdir")
    return {**current, "epoch": int(saved["epoch"]), "batch": int(saved["batch"]),
            "skipped": int(saved.get("skipped", 0)) if jax.process_index() == 0 else 0}


def _headline(metrics: dict[str, float]) -> str:
    if "top1" in metrics:
        return f"top1 {metrics['top1']:.1f}%"
    return f"R@1 t2i {metrics['t2i_r1']:.1f}% i2t {metrics['i2t_r1']:.1f}%"


