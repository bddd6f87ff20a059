"""``from_pretrained`` / ``save_pretrained``, written once for every model altjax stores.

A model class inherits ``PretrainedModel`` and says three things about itself: the ``model_type``
of its ``config.json``, its ``config_class`` (a dataclass with ``from_hf`` / ``to_hf``), and its
``conversion_table`` (config -> ``engine.Table``, the mapping to transformers' state dict). It is
built as ``cls(config, dtype=..., rngs=nnx.Rngs(seed))`` and keeps its config as ``.config``.
Nothing here knows a specific model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar, Optional

import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from altjax import fsutil, sharding
from altjax.model_io import engine
from altjax.model_io.directories import (
    ALTJAX_PARAMS_DIR,
    CONFIG_NAME,
    CheckpointError,
    atomic_directory,
    check_model_type,
    copy_processor_files,
    is_altjax_dir,
    model_dir,
    read_config,
    write_json,
)
from altjax.model_io.hf_weights import DEFAULT_MAX_SHARD_SIZE, open_weights, write_hf_weights
from altjax.model_io.orbax_params import restore_orbax, save_orbax

FORMATS = ("altjax", "hf")
# Metadata of a config dataclass field of altjax's own (such as ``scan_layers``): the config's
# ``to_hf()`` leaves it out, and an altjax directory's config.json records it when not at its default.
ALTJAX_ONLY = "altjax_only"
SCAN_LAYERS = "scan_layers"


def _with_altjax_fields(config: Any, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (``config.to_hf()``) with the altjax fields of ``config`` and of its nested configs
    that differ from their defaults."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get(ALTJAX_ONLY):
            if value != f.default:
                d[f.name] = value
        elif dataclasses.is_dataclass(value) and isinstance(d.get(f.name), dict):
            _with_altjax_fields(value, d[f.name])
    return d


def with_scan_layers(config: Any, scan_layers: bool) -> tuple[Any, bool]:
    """``config`` with ``scan_layers`` set in it and every nested config that has the field, and
    whether any had it."""
    changes, found = {}, False
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == SCAN_LAYERS:
            changes[f.name], found = scan_layers, True
        elif dataclasses.is_dataclass(value):
            value, inner = with_scan_layers(value, scan_layers)
            if inner:
                changes[f.name], found = value, True
    return (dataclasses.replace(config, **changes) if changes else config), found


def _abstract(cls, config, dtype, seed: int):
    """``cls(config)`` built abstractly: every variable a ``jax.ShapeDtypeStruct``, nothing computed."""

    def build():
        # Traced draw counters made building take time quadratic in depth: 48 + 48 narrow CLIP
        # layers loaded in 110 s, 24 + 24 in 25 s (see sharding.host_counters).
        with sharding.host_counters(nnx.Rngs(seed)) as rngs:
            return cls(config, dtype=dtype, rngs=rngs)

    return nnx.eval_shape(build)


def _sharding_of(mesh, rules) -> Optional[Callable[[str, tuple[int, ...]], NamedSharding]]:
    if mesh is None:
        return None
    rules = sharding.PARTITION_RULES if rules is None else rules

    def of(path: str, shape: tuple[int, ...]):
        return NamedSharding(mesh, sharding.partition_spec(path.replace(".", "/"), shape, mesh, rules))

    return of


class PretrainedModel:
    """Loading from and saving to HF and altjax model directories, for an ``nnx.Module`` subclass."""

    # The model_type of config.json that this class reads and writes.
    model_type: ClassVar[str]
    # Other model_types whose directories it can also read (a text tower reads a whole dual encoder).
    also_reads: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type]
    # The directory from_pretrained read, whose processor files save_pretrained copies along.
    name_or_path: Optional[str] = None

    @staticmethod
    def conversion_table(config: Any) -> engine.Table:
        """The mapping between this model's parameters and transformers' state dict for ``config``."""
        raise NotImplementedError

    @classmethod
    def config_from_hf(cls, d: dict[str, Any]) -> Any:
        """The config of a ``config.json`` dict this class reads (``also_reads`` ones included)."""
        return cls.config_class.from_hf(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, seed: int = 0, mesh=None, rules=None,
                        scan_layers: Optional[bool] = None, progress: bool = False, revision: Optional[str] = None,
                        cache_dir: Optional[str | os.PathLike] = None):
        """Loads an HF directory (``config.json`` + safetensors, sharded safetensors or
        ``pytorch_model.bin``; torch is needed only for ``.bin``) or an altjax directory
        (``save_pretrained``), without initialising random weights first. ``path`` may also be a
        Hugging Face Hub id (``org/name``) that is not a local path: its config, weights and
        processor files are fetched into the Hub cache (or found there offline, ``HF_HUB_OFFLINE``),
        at ``revision`` (default ``main``) and in ``cache_dir`` (default the Hub cache), see
        ``altjax.hub``.

        ``dtype`` is the compute dtype (parameters stay float32); ``seed`` seeds the dropout
        streams. The model is built abstractly and filled one tensor at a time; with a ``mesh``
        each parameter is placed directly in its ``altjax.sharding`` layout (``rules`` default to
        ``sharding.PARTITION_RULES``), with no full replica on any device. ``scan_layers`` (default:
        the directory's layout, unrolled for an HF directory) chooses the layout of the towers that
        have the option: stacked layers run by a scan, or one module per layer; either loads from
        either directory (a layout change goes through the model's table and reads an altjax
        directory's parameters onto the host first). Every key spelling the
        model's table accepts loads, and stale non-persistent buffers of older checkpoints are
        ignored. Raises ``CheckpointError`` when the directory is not one of this model (or a Hub id
        cannot be had) and
        ``ConversionError`` naming every missing, unexpected or misshapen tensor.
        """
        path = model_dir(path, revision=revision, cache_dir=cache_dir)
        config_dict = read_config(path)
        check_model_type(config_dict, (cls.model_type, *cls.also_reads), path)
        try:
            stored = cls.config_from_hf(config_dict)
            model = _abstract(cls, stored, dtype, seed)
        except (ValueError, TypeError, KeyError) as e:  # a config the model cannot be built from
            raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
        config = stored
        if scan_layers is not None:
            config, found = with_scan_layers(stored, scan_layers)
            if not found and scan_layers:
                raise ValueError(f"{cls.__name__} has no layers to scan (no scan_layers in its config)")
        stored_shapes = engine.model_shapes(model)
        if config != stored:
            model = _abstract(cls, config, dtype, seed)
        shardings = _sharding_of(mesh, rules)
        shapes = engine.model_shapes(model)
        if is_altjax_dir(path) and config == stored:
            params = restore_orbax(os.path.join(path, ALTJAX_PARAMS_DIR), shapes, shardings)
        elif is_altjax_dir(path):
            restored = restore_orbax(os.path.join(path, ALTJAX_PARAMS_DIR), stored_shapes, None)
            tensors = engine.nnx_to_torch({k: restored[k] for k in stored_shapes}, cls.conversion_table(stored),
                                          on_disk=False, lazy=True)
            params = engine.torch_to_nnx(tensors, cls.conversion_table(config), shapes, source=path, lazy=True)
        else:
            tensors = open_weights(path)
            params = engine.torch_to_nnx(tensors, cls.conversion_table(config), shapes,
                                         source=getattr(tensors, "file", path), lazy=True)
        engine.load_params(model, params, sharding=shardings, progress=progress)
        # Stacked layers hold one dropout key per layer: each gets its own, split from the seed.
        nnx.reseed(model, default=seed, dropout=seed, policy="match_shape")
        model.name_or_path = path
        return model

    def save_pretrained(self, path: str | os.PathLike, *, format: str = "altjax",
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                        progress: bool = False) -> str:
        """Writes the model as an altjax or HF directory, atomically; returns its absolute path.

        ``format="altjax"``: ``config.json`` (with altjax's own config fields, such as
        ``scan_layers``, where they differ from their defaults), orbax ``params/`` and the processor
        files of the directory the model was loaded from. ``format="hf"``: ``config.json``, safetensors with
        the key spellings transformers 5 writes (sharded above ``max_shard_size``) and the
        processor files, loadable by transformers' ``from_pretrained``; a round trip is bit-exact.
        ``overwrite`` replaces only an earlier output of altjax, never the source or a directory
        above it.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be 'altjax' or 'hf', got {format!r}")
        source = self.name_or_path
        variables = engine.model_variables(self)
        with atomic_directory(path, overwrite=overwrite, sources=(source,)) as tmp:
            config = self.config.to_hf()
            write_json(os.path.join(tmp, CONFIG_NAME),
                       _with_altjax_fields(self.config, config) if format == "altjax" else config)
            if format == "altjax":
                save_orbax(os.path.join(tmp, ALTJAX_PARAMS_DIR), {k: v.get_value() for k, v in variables.items()})
            else:
                tensors = engine.nnx_to_torch(engine.LazyVariables(variables), self.conversion_table(self.config),
                                              on_disk=True, lazy=True)
                write_hf_weights(tmp, tensors, max_shard_size=max_shard_size, progress=progress)
            copy_processor_files(source, tmp)
        return os.fspath(path) if fsutil.is_remote(path) else os.path.abspath(os.fspath(path))
