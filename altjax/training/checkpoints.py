"""Training checkpoints: orbax, asynchronous, the last K kept, restored exactly, damage tolerated.

A checkpoint is one orbax step directory ``<workdir>/checkpoints/<step>`` with two items:

* ``state``: the whole train state (trainable and frozen parameters, BatchNorm statistics, the
  dropout streams' keys and counters, the optimiser state, the step) as a nested dict of arrays
  named by their paths, each written by every process in its own sharded layout.
* ``meta``: JSON with the step, the leaf paths (so that a checkpoint of another model or optimiser
  fails with a readable message) and the input pipeline's state, a global position (the same on
  every process).

The arrays are restored straight into the layout of the run that reads them (its shardings are
the restore target), so a checkpoint written by one topology (processes x devices) is read by
any other.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
while saving leaves no step directory that looks finished. A step that still fails to restore
(a file lost or truncated afterwards) is reported as a warning and the one before it is used.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from altjax.sharding import path_to_str

log = logging.getLogger("altjax.train")
# Orbax names a step directory being written "<step>.orbax-checkpoint-tmp".
TMP_MARKER = ".orbax-checkpoint-tmp"
# Prefix of a temporary directory an interrupted process moved aside (Checkpointer.remove_temporary)
# but could not delete in time; the next run on the workdir deletes it.
ABANDONED = ".abandoned-"


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none of them restores."""


class CheckpointSaveFailed(RuntimeError):
    """An asynchronous save failed (a full disk, lost storage): the run stops before more work is lost."""


class IncompatibleCheckpoint(ValueError):
    """A checkpoint of another train state (another model, optimiser or set of frozen parameters)."""


class _QuietBackgroundFailures(logging.Filter):
    """Drops orbax's own report of a failed background save (its traceback runs to hundreds of
    lines): :meth:`Checkpointer.check` raises the same exception, reported in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname)


_QUIET = _QuietBackgroundFailures()


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


class _Layout:
    """Paths of the train state's leaves and the conversion to / from orbax's nested dicts.

    Typed PRNG keys (the dropout streams) are stored as their raw uint32 key data.
    """

    def __init__(self, state):
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.paths = [path_to_str(p) for p, _ in leaves]
        if len(set(self.paths)) != len(self.paths):
            raise ValueError("the train state has leaves whose paths collide")
        self.key_impls = {p: jax.random.key_impl(x) for p, (_, x) in zip(self.paths, leaves) if _is_key(x)}
        self.abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for _, x in leaves]

    def to_tree(self, state) -> dict:
        leaves = jax.tree.leaves(state)
        return self.to_tree_of([jax.random.key_data(x) if p in self.key_impls else x
                                for p, x in zip(self.paths, leaves)])

    def target(self) -> dict:
        def spec(path, x):
            if path in self.key_impls:
                data = jax.eval_shape(jax.random.key_data, x)
                return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        return self.to_tree_of([spec(p, x) for p, x in zip(self.paths, self.abstract)])

    def to_tree_of(self, leaves) -> dict:
        out: dict = {}
        for path, leaf in zip(self.paths, leaves):
            node = out
            *parents, last = path.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = leaf
        return out

    def from_tree(self, tree: dict):
        leaves = []
        for path in self.paths:
            node = tree
            for part in path.split("/"):
                node = node[part]
            if path in self.key_impls:
                node = jax.random.wrap_key_data(node, impl=self.key_impls[path])
            leaves.append(node)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def remove_temporary(directory: str) -> None:
    """Deletes the temporary checkpoint directories in ``directory`` of saves that will not finish:
    the last thing a process does before it exits. Orbax's writer threads go on creating files,
    and with them their parent directories, until the process ends, so a directory deleted under
    them comes back. Each one is therefore moved aside and replaced by an empty file of the same
    name, which no writer can turn back into a directory; the files go last, moments before the
    exit."""
    placeholders, aside = [], []
    for attempt in range(100):
        try:
            names = [n for n in os.listdir(directory)
                     if TMP_MARKER in n and os.path.isdir(os.path.join(directory, n))]
        except OSError:
            break
        if not names:
            break
        for name in names:
            path = os.path.join(directory, name)
            moved = os.path.join(directory, f"{ABANDONED}{attempt}-{name.split('.')[0]}")
            try:
                os.rename(path, moved)
                aside.append(moved)
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                placeholders.append(path)
            except OSError:
                pass  # a writer got there first: the next pass moves what it made
    # Writers holding a moved directory may still be adding to it; a few passes outlast them.
    deadline = time.monotonic() + 2.0
    while aside and time.monotonic() < deadline:
        for moved in aside:
            shutil.rmtree(moved, ignore_errors=True)
        aside = [m for m in aside if os.path.lexists(m)]
    for path in placeholders:
        try:
            os.unlink(path)
        except OSError:
            pass


class Checkpointer:
    """Saves and restores train states in ``directory``.

    ``state``: a train state of the run (its structure, shapes and shardings are the restore
    target; its values are not used). ``keep``: how many recent checkpoints to keep.
    ``asynchronous``: write in the background while training goes on.
    """

    def __init__(self, directory: str, state, *, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        self.layout = _Layout(state)
        if jax.process_index() == 0:
            self._remove_abandoned()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=asynchronous)
        # Orbax's default splits every replicated array into one slice per device to write them in
        # parallel, compiling a slicing program per shape and device on the first save (measured:
        # 50 s for a tiny model on 8 CPU devices). Parameters big enough to matter are sharded
        # (sharding.FSDP), so each replicated array is written whole from its first replica.
        arrays = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
        state_handler = ocp.PyTreeCheckpointHandler(type_handler_registry=arrays)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.PyTreeSave, state_handler)
        registry.add("state", ocp.args.PyTreeRestore, state_handler)
        registry.add("meta", ocp.args.JsonSave)
        registry.add("meta", ocp.args.JsonRestore)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._saving: Optional[int] = None
        # Kept for the process's life: orbax's threads may report a failed save after close().
        logging.getLogger("absl").addFilter(_QUIET)

    def steps(self) -> list[int]:
        """The finished checkpoints' steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict[str, Any]) -> None:
        """Starts saving ``state`` at ``step`` with the input pipeline's (global) state."""
        meta = {"step": int(step), "paths": self.layout.paths, "data": data_state}
        self.check()  # a failure of the previous save is reported as that step's
        self._saving = int(step)
        try:
            self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(self.layout.to_tree(state)), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:  # noqa: BLE001 - a save that cannot start is a storage failure too
            raise self._failed(error) from None

    def check(self) -> None:
        """Raises CheckpointSaveFailed if a save started earlier has failed in the background."""
        # The manager's own check_for_errors misses a failure its finalising thread has already
        # taken from the checkpointer; once no save is in progress, waiting returns at once and
        # raises whatever the last save raised.
        if not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until every started save is on disk (CheckpointSaveFailed if one failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._failed(error) from None

    def _failed(self, error: BaseException) -> CheckpointSaveFailed:
        why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        good = [s for s in self._finished_steps() if s != self._saving]
        return CheckpointSaveFailed(
            f"saving the checkpoint of step {self._saving} failed ({why}); the run stopped; the last good "
            f"checkpoint is {good[-1] if good else 'none'} in {self.directory}; fix the storage and run the same "
            "command again to resume from it")

    def _finished_steps(self) -> list[int]:
        return self.finished_steps(self.directory)

    @staticmethod
    def finished_steps(directory: str) -> list[int]:
        """The steps of the complete checkpoints in ``directory``, read from its listing alone
        (no orbax manager, nothing waited for): for a process about to exit."""
        try:
            return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
        except OSError:
            return []

    def _remove_abandoned(self) -> None:
        """Deletes what interrupted runs left: temporary step directories (orbax's own clean-up
        runs in the background and passes over some), directories that remove_temporary moved
        aside and its placeholder files. The run holds the workdir's lock, so nothing is writing."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(ABANDONED) or TMP_MARKER in name:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)

    def remove_temporary(self) -> None:
        """See :func:`remove_temporary`: for a process about to exit with saves unfinished."""
        remove_temporary(self.directory)

    def restore_latest(self) -> Optional[tuple[int, Any, list[dict[str, Any]]]]:
        """``(step, state, data_state)`` of the newest checkpoint that restores, or None when there
        is no checkpoint. A checkpoint that fails to read is reported with a warning and, once an
        older one has restored, moved to ``<directory>.damaged/`` (the run writes that step again).
        IncompatibleCheckpoint when the checkpoints hold another model or optimiser (a changed
        config, not damage); NoUsableCheckpoint when none restores (nothing is moved then)."""
        steps = self.steps()
        damaged = []
        for step in reversed(steps):
            try:
                restored = self._restore(step)
            except IncompatibleCheckpoint:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                            self.directory, step, type(error).__name__, str(error).splitlines()[0][:300])
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged)
            return (step, *restored)
        if steps:
            raise NoUsableCheckpoint(f"none of the checkpoints {steps} in {self.directory} can be restored")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = f"{self.directory}.damaged"
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}-{int(time.time())}")
                os.rename(os.path.join(self.directory, str(step)), target)
                log.warning("moved the damaged checkpoint %d to %s", step, target)
        multihost_utils.sync_global_devices("altjax checkpoints set aside")
        self.manager.reload()

    def _restore(self, step: int):
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("step") != step:
            raise ValueError(f"its metadata says step {meta.get('step')}")
        if meta.get("paths") != self.layout.paths:
            saved, mine = set(meta.get("paths") or ()), set(self.layout.paths)
            raise IncompatibleCheckpoint(
                f"checkpoint {self.directory}/{step} holds another train state than this config builds (only in "
                f"the checkpoint: {sorted(saved - mine)[:5]}, only in this run: {sorted(mine - saved)[:5]}); "
                "use the config it was written with, or another workdir")
        target = self.layout.target()
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["state"]
        state = self.layout.from_tree(restored)
        bad = [p for p, x in zip(self.layout.paths, jax.tree.leaves(state))
               if not _is_key(x) and np.issubdtype(x.dtype, np.floating)
               and not all(np.isfinite(np.asarray(s.data)).all() for s in x.addressable_shards)]
        if bad:
            raise ValueError(f"non-finite values in {bad[:3]}")
        return state, meta["data"]

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()
