"""The parameters of an altjax directory: an orbax checkpoint under ``params/``, one zarr array
per parameter.

Read with tensorstore, one array at a time as it is loaded (straight into a mesh sharding when
one is given), after checking that every array and chunk file is there: a damaged directory is
reported on one line naming the file or the missing array. Checkpoints in orbax's other layout
(OCDBT, as altjax wrote before) are restored with orbax itself.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from altjax.model_io.directories import CheckpointError
from altjax.model_io.engine import ConversionError, problems_message


class _Consumed(Mapping[str, Any]):
    """A dict whose entries are dropped as they are read: each host array can be freed once its
    device copy exists."""

    def __init__(self, params: dict[str, Any]):
        self._params = params
        self._shapes = {k: tuple(np.shape(v)) for k, v in params.items()}

    def __getitem__(self, key: str) -> Any:
        return self._params.pop(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _check_against_model(directory: str, stored_shapes: Mapping[str, tuple[int, ...]],
                         shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(shapes) - set(stored_shapes))
    unexpected = sorted(set(stored_shapes) - set(shapes))
    bad = [f"{k}: checkpoint has {stored_shapes[k]}, the model expects {tuple(shapes[k])}"
           for k in shapes if k in stored_shapes and stored_shapes[k] != tuple(shapes[k])]
    message = problems_message([("missing parameters", missing), ("unexpected parameters", unexpected),
                                ("shape mismatches", bad)])
    if message:
        raise ConversionError(f"{directory} does not match the model: {message}")


def _tensorstore_error(e: BaseException) -> str:
    # tensorstore appends the whole JSON spec and source locations: the first clause says it all.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"\s*\[(tensorstore_spec|source locations)=.*$", "", message)


def _orbax_layout(directory: str) -> Optional[list[str]]:
    """The array names ``directory/_METADATA`` lists, when the checkpoint has the layout altjax
    writes (one zarr v2 array directory per parameter, no OCDBT); ``None`` for other orbax
    layouts (OCDBT, as altjax wrote before), which orbax itself restores."""
    file = os.path.join(directory, "_METADATA")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; the altjax directory is incomplete (export or convert it again)")
    try:
        with open(file, encoding="utf-8") as f:
            metadata = json.load(f)
        if metadata.get("use_ocdbt", True) or metadata.get("use_zarr3", False):
            return None
        names = []
        for entry in metadata["tree_metadata"].values():
            names.append(".".join(str(k["key"]) for k in entry["key_metadata"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the altjax directory is damaged") from None
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not orbax checkpoint metadata (no {e}); the altjax directory is damaged") from None
    return names


class _OrbaxArrays(Mapping[str, Any]):
    """The arrays of an orbax checkpoint as altjax writes it (zarr v2, one directory per array),
    read with tensorstore one array at a time as they are looked up: as host arrays, or with
    ``shardings`` straight into the mesh, each process reading only its devices' slices.

    Read synchronously, without orbax: orbax closes its asyncio loop as soon as one read fails
    while the others are still in flight, and each of them then prints an ``Event loop is
    closed`` traceback at exit."""

    def __init__(self, directory: str, names: list[str], shardings):
        import tensorstore as ts

        self.directory, self._shardings = directory, shardings
        for name in names:
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder):
                raise CheckpointError(f"{directory}: the array {name!r} is missing (no {name}/ directory); "
                                      "the altjax directory is incomplete (export or convert it again)")
        opening = {name: ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(directory, name) + "/"},
                                  "fill_missing_data_reads": False}, open=True, read=True) for name in names}
        self._stores = {}
        for name, future in opening.items():
            try:
                self._stores[name] = future.result()
            except Exception as e:
                raise CheckpointError(f"{os.path.join(directory, name)}: cannot open the array "
                                      f"({_tensorstore_error(e)}); the altjax directory is damaged") from None
        for name, store in self._stores.items():  # a chunk file gone is reported before anything is read
            if 0 in store.shape:
                continue
            chunks = store.chunk_layout.read_chunk_template.shape
            separator = store.spec().to_json().get("metadata", {}).get("dimension_separator") or "."
            grid = [range(-(-n // c)) for n, c in zip(store.shape, chunks)]
            for index in itertools.product(*grid):
                chunk = separator.join(map(str, index)) if index else "0"
                if not os.path.isfile(os.path.join(directory, name, chunk)):
                    raise CheckpointError(f"{os.path.join(directory, name, chunk)}: missing (a chunk of the array "
                                          f"{name!r}); the altjax directory is incomplete (export or convert it again)")

    def _read(self, name: str, index=()) -> np.ndarray:
        try:
            return self._stores[name][index].read().result()
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.directory, name)}: cannot read the array "
                                  f"({_tensorstore_error(e)}); the altjax directory is damaged") from None

    def __getitem__(self, name: str) -> Any:
        if name not in self._stores:
            raise KeyError(name)
        if not self._shardings:
            return self._read(name)
        import jax

        shape = self.shape(name)
        sharding = self._shardings(name, shape)
        by_device = sharding.addressable_devices_indices_map(shape)
        slices: dict[tuple, np.ndarray] = {}
        arrays = []
        for device, index in by_device.items():
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in slices:  # replicas read once
                slices[key] = self._read(name, index)
            arrays.append(jax.device_put(slices[key], device))
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._stores[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stores)

    def __len__(self) -> int:
        return len(self._stores)


def restore_orbax(directory: str, shapes: Mapping[str, tuple[int, ...]], shardings) -> Mapping[str, Any]:
    """The arrays of the orbax checkpoint in ``directory``, path -> array, checked against the
    model's ``shapes`` first (every missing, unexpected or misshapen array named). Each is read
    when looked up: as a host array, or with ``shardings(path, shape)`` straight into the mesh."""
    directory = os.path.abspath(directory)
    names = _orbax_layout(directory)
    if names is None:
        return _Consumed(_restore_orbax_with_orbax(directory, shapes, shardings))
    arrays = _OrbaxArrays(directory, names, shardings)
    _check_against_model(directory, {k: arrays.shape(k) for k in arrays}, shapes)
    return arrays


def _restore_orbax_with_orbax(directory: str, shapes: Mapping[str, tuple[int, ...]], shardings) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)  # orbax resolves relative paths against nothing useful
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(directory)
        stored = _flatten(dict(getattr(metadata, "item_metadata", metadata)))
    except Exception as e:
        raise CheckpointError(f"{directory}: not a readable orbax checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") from None
    stored_shapes = {k: tuple(v.shape) for k, v in stored.items()}
    _check_against_model(directory, stored_shapes, shapes)
    if shardings:
        # Straight into the mesh: each device reads only its own slice.
        target = {k: jax.ShapeDtypeStruct(stored_shapes[k], stored[k].dtype, sharding=shardings(k, stored_shapes[k]))
                  for k in stored}
        args = ocp.args.PyTreeRestore(item=_nest(target), restore_args=_nest(
            {k: ocp.ArrayRestoreArgs(sharding=v.sharding) for k, v in target.items()}))
    else:
        # As host arrays, which load_params turns into device arrays one at a time, dropping each
        # host copy as it goes; restoring device arrays directly would hold both trees at once.
        target = {k: np.empty((0,), stored[k].dtype) for k in stored}
        args = ocp.args.PyTreeRestore(item=_nest(target), restore_args=_nest(
            {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in stored}))
    try:
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(directory, args=args)
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot restore the orbax checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") from None
    return _flatten(restored)


def save_orbax(directory: str, params: Mapping[str, Any]) -> None:
    """Writes ``params`` (path -> array) as an orbax checkpoint in the layout ``restore_orbax`` reads.

    In a multi-process run this process writes alone (the others take no part): every array must
    then be held whole by it (gathered first, e.g. ``multihost_utils.process_allgather``)."""
    import jax
    import orbax.checkpoint as ocp

    alone = None
    if jax.process_count() > 1:
        partial = [k for k, v in params.items() if isinstance(v, jax.Array) and not v.is_fully_addressable]
        if partial:
            raise ValueError(f"save_orbax in a multi-process run writes from one process; {partial[:3]} are "
                             "sharded over several processes (gather them first)")
        # Orbax refuses jax arrays that live on one process of several: host copies are written.
        params = {k: np.asarray(v) for k, v in params.items()}
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})

    # One tensorstore per parameter instead of OCDBT's shared store: OCDBT gathers every array
    # into a host copy first (measured: align-base conversion peak 2.2x the checkpoint, vs 1.4x).
    # No replica-parallel writes: orbax would compile a slicing program per shape and device for
    # replicated arrays (tens of seconds for a tiny model on 8 CPU devices).
    arrays = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()))
    options = {} if alone is None else {"multiprocessing_options": alone}
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=arrays, **options)
    absl = logging.getLogger("absl")
    absl.addFilter(_quiet_save)
    try:
        ocp.Checkpointer(handler, **options).save(os.path.abspath(directory), _nest(params))
    except OSError:
        raise
    except Exception as e:
        # A write that failed (a full disk, no permission) arrives as a ValueError carrying
        # tensorstore's status: one line saying which file and why, as an OSError would.
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), directory) from None
        raise
    finally:
        absl.removeFilter(_quiet_save)


def _quiet_save(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    # Without OCDBT (on purpose, above) orbax warns at every save that it found no per-process
    # OCDBT directories to merge: nothing is wrong, and the warning names a temporary directory.
    # A failed write is logged with its traceback by each of orbax's writer threads; the save
    # then raises, and that error is reported once.
    return "Skipping merge of OCDBT checkpoints" not in message and "_SignalingThread.run() raised" not in message
