"""One device mesh for data and parameters, parameter partition rules, sharded initialisation.

The mesh has the axes ``("data", "model")``. The batch is split over the *batch axes*, every mesh
axis except ``"model"`` (so ``("data",)`` for the default mesh); parameters are split by a short
table of rules, each a regular expression on the parameter path (``"text_projection/kernel"``,
``"text_model/encoder/layer/0/attention/self/query/kernel"``) and the PartitionSpec to use. The
first rule whose pattern matches (``re.search``) wins. The spec ``FSDP`` means: shard the largest
dimension divisible by the batch-axis device count over the batch axes if the parameter has at
least ``fsdp_min_size`` elements, else replicate (fully sharded data parallelism, which costs
nothing in a mesh whose data axis has one device); a stacked parameter's layer axis is never the
one (see below).

Tensor parallelism is a rule away, e.g. ``(r"attention/self/(query|key|value)/kernel$",
P(None, "model"))`` placed before the default rule.

A tower built with ``scan_layers`` holds its layers stacked: each of their parameters has a leading
layer axis (:func:`layer_axis`). That axis is never split: ``FSDP`` picks among the other
dimensions, and an explicit rule that puts a mesh axis on it is refused, because ``nnx.scan`` would
gather the whole stack on every device before its first step.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXIS_NAMES = (DATA_AXIS, MODEL_AXIS)

FSDP = "fsdp"
"""Rule target: shard the largest divisible dimension (never a layer axis) over the batch axes (see
module docstring)."""

FSDP_MIN_SIZE = 2**18
"""Parameters with fewer elements (1 MiB in fp32) stay replicated under ``FSDP``."""

Rule = tuple[str, Union[P, str]]

PARTITION_RULES: tuple[Rule, ...] = (
    # The learnable logit scalars (ALIGN's temperature, AltCLIP's logit_scale) stay replicated
    # whatever fsdp_min_size is: every device needs them for the loss.
    (r"(^|/)(temperature|logit_scale|logit_bias)$", P()),
    (r".*", FSDP),
)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "model") mesh over ``devices`` (default: all global devices).

    One of the sizes may be -1, meaning "all the remaining devices"; a config's ``mesh`` entry
    ``{"data": -1, "model": 1}`` is used as ``make_mesh(**config.mesh)``. The axes are of type
    Auto, so jit propagates shardings the usual (GSPMD) way; ``contrastive_loss`` uses
    ``jax.shard_map`` for its explicit collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, model]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, model={model}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data}, model={model}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(f"mesh data={sizes[0]} x model={sizes[1]} does not use the {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), AXIS_NAMES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: every axis except ``"model"``."""
    return tuple(name for name in mesh.axis_names if name != MODEL_AXIS)


def batch_size_divisor(mesh: Mesh) -> int:
    """Number of devices on the batch axes; global batch sizes must be multiples of it."""
    return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def _spec_entry(axes: tuple[str, ...]):
    """A PartitionSpec entry for a dimension split over ``axes``."""
    return axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, everything else replicated."""
    return NamedSharding(mesh, P(_spec_entry(batch_axes(mesh))))


def path_to_str(path) -> str:
    """A pytree key path as ``"a/b/0/c"``, dropping the ``.value`` of nnx Variables."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


LAYER_STACK = r"(?:^|/)layers?/(?!\d+(?:/|$))[^/]"
"""Regex (``re.search``) for the paths of stacked layer parameters: see :func:`layer_axis`."""


def layer_axis(path) -> Optional[int]:
    """The layer axis of the parameter at ``path`` (a string or a pytree key path): 0 if it belongs
    to stacked layers, None otherwise.

    A tower built with ``scan_layers`` keeps its encoder layers in one module, under the attribute
    name the unrolled list has (``layers`` or ``layer``), whose variables carry a leading layer axis:
    ``text_model/encoder/layer/attention/self/query/kernel`` is the stacked form of
    ``text_model/encoder/layer/0/attention/self/query/kernel``. So a parameter is stacked when a
    path component ``layers`` or ``layer`` is followed by one that is not a layer index
    (:data:`LAYER_STACK`). The test is a search, not a match from the start, so that optimizer-state
    paths (``opt_state/1/0/mu/<parameter path>``) answer as their parameters do.

    Code that treats a parameter as a whole must treat a stacked one layer by layer: ``nnx.scan``
    needs the layer axis whole on every device (so sharding never splits it), and per-parameter
    optimizer statistics (LAMB's trust ratio, weight decay's "is it a matrix") are per layer in the
    unrolled model.
    """
    name = path if isinstance(path, str) else path_to_str(path)
    return 0 if re.search(LAYER_STACK, name) else None


def _fsdp_spec(shape, mesh: Mesh, fsdp_min_size: int, layer_dim: Optional[int]) -> P:
    axes = batch_axes(mesh)
    num = batch_size_divisor(mesh)
    if num == 1 or math.prod(shape) < fsdp_min_size:
        return P()
    candidates = [d for d in range(len(shape)) if shape[d] % num == 0 and d != layer_dim]
    if not candidates:
        return P()
    # Largest dimension first; among equals the last one, which keeps matmul inputs contiguous.
    dim = max(candidates, key=lambda d: (shape[d], d))
    spec = [None] * len(shape)
    spec[dim] = _spec_entry(axes)
    return P(*spec)


def _check_spec(path: str, shape, spec: P, mesh: Mesh, layer_dim: Optional[int]) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"partition rule for {path!r}: spec {spec} has more entries than its shape {shape}")
    if layer_dim is not None and layer_dim < len(spec) and spec[layer_dim] is not None:
        raise ValueError(f"partition rule for {path!r}: spec {spec} splits dimension {layer_dim}, the "
                         f"layer axis of stacked layers, which a scan would gather whole on every device")
    for size, entry in zip(shape, spec):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        count = math.prod(mesh.shape[name] for name in names)
        if size % count:
            raise ValueError(f"partition rule for {path!r}: dimension {size} of {shape} is not "
                             f"divisible by the {count} devices of mesh axes {names} in spec {spec}")


def partition_spec(path, shape, mesh: Mesh, rules: Sequence[Rule] = PARTITION_RULES, *,
                   fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
    """The PartitionSpec of the parameter at ``path`` (a string or a pytree key path).

    The first rule whose regex matches the path decides; a path that no rule matches is an error,
    and so is a rule that splits the layer axis of a stacked parameter (:func:`layer_axis`).
    """
    name = path if isinstance(path, str) else path_to_str(path)
    shape = tuple(shape)
    layer_dim = layer_axis(name)
    for pattern, spec in rules:
        if re.search(pattern, name):
            if isinstance(spec, str):
                if spec != FSDP:
                    raise ValueError(f"rule {pattern!r}: unknown spec {spec!r} (a PartitionSpec or FSDP)")
                return _fsdp_spec(shape, mesh, fsdp_min_size, layer_dim)
            _check_spec(name, shape, spec, mesh, layer_dim)
            return spec
    raise ValueError(f"no partition rule matches parameter {name!r}")


def state_shardings(state, mesh: Mesh, rules: Sequence[Rule] = PARTITION_RULES, *,
                    fsdp_min_size: int = FSDP_MIN_SIZE):
    """NamedShardings for every leaf of ``state`` (an nnx.State or any pytree of arrays/shapes)."""
    def one(path, leaf):
        return NamedSharding(mesh, partition_spec(path, np.shape(leaf), mesh, rules,
                                                  fsdp_min_size=fsdp_min_size))

    return jax.tree_util.tree_map_with_path(one, state)


@contextlib.contextmanager
def host_counters(rngs: nnx.Rngs) -> Iterator[nnx.Rngs]:
    """``rngs`` with its streams' draw counters on the host (NumPy) while the context is active,
    for building a model under a trace (``nnx.eval_shape``, ``jax.jit``); they are JAX arrays again
    on exit. The keys drawn are the same as with JAX counters.

    Traced, each counter update costs time linear in everything traced before it (flax compares
    the new counter's sharding with the old one's, and JAX's error for a tracer's missing sharding
    walks the trace), so building a model took time quadratic in its depth.
    """
    counts = [count for _, count in nnx.to_flat_state(nnx.state(rngs, nnx.RngCount))]
    for count in counts:
        count.set_value(np.zeros(np.shape(count.get_value()), np.uint32))
        # A trace keeps a NumPy constant by reference and flax increments the counter in place, so
        # each draw must read a copy: else every key drawn under jit would see the final count.
        # (nnx.split_rngs swaps in a traced counter, which is left alone.)
        count.set_metadata(on_get_value=lambda _, v: v.copy() if isinstance(v, np.ndarray) else v)
    try:
        yield rngs
    finally:
        for count in counts:
            count.del_metadata("on_get_value")
            count.set_value(jnp.asarray(count.get_value()))


def _builder(make_model: Callable[[nnx.Rngs], nnx.Module], seed: int) -> Callable[[], nnx.Module]:
    def build():
        with host_counters(nnx.Rngs(seed)) as rngs:
            return make_model(rngs)

    return build


def abstract_state(make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh,
                   rules: Sequence[Rule] = PARTITION_RULES, *, fsdp_min_size: int = FSDP_MIN_SIZE,
                   seed: int = 0):
    """``(graphdef, state)`` of the model without computing it: the state's leaves are
    ``jax.ShapeDtypeStruct``s carrying their NamedShardings (an orbax restore target, say).
    ``make_model`` and ``seed`` as for :func:`sharded_init`.
    """
    graphdef, state = nnx.split(nnx.eval_shape(_builder(make_model, seed)))
    shardings = state_shardings(state, mesh, rules, fsdp_min_size=fsdp_min_size)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return graphdef, state


def sharded_init(make_model: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh,
                 rules: Sequence[Rule] = PARTITION_RULES, *, fsdp_min_size: int = FSDP_MIN_SIZE,
                 seed: int = 0):
    """Builds ``make_model(rngs)`` (e.g. ``lambda rngs: AlignModel(config, rngs=rngs)``) with every
    parameter created directly in its sharded layout.

    ``rngs`` is an ``nnx.Rngs(seed)`` made here, whose draw counters stay on the host while the
    model is traced (:func:`host_counters`): a model that made its own ``nnx.Rngs`` would carry
    traced counters, and building it would take time quadratic in its depth. The model is traced
    abstractly, the shardings are derived from its shapes, and the initialisers run under
    ``jax.jit`` with those ``out_shardings``, so each device only computes and holds its shards.
    With JAX's default partitionable threefry the values equal those of an unsharded
    ``make_model(nnx.Rngs(seed))``.
    """
    graphdef, abstract = abstract_state(make_model, mesh, rules, fsdp_min_size=fsdp_min_size, seed=seed)
    build = _builder(make_model, seed)

    def init():
        return nnx.split(build())[1]

    state = jax.jit(init, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))()
    return nnx.merge(graphdef, state)


def process_batch_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process must load for ``shard_batch``."""
    if global_batch % batch_size_divisor(mesh):
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{batch_size_divisor(mesh)} devices on the batch axes {batch_axes(mesh)}")
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
    starts = {index[0].start or 0 for index in indices}
    stops = {global_batch if index[0].stop is None else index[0].stop for index in indices}
    rows = slice(min(starts), max(stops))
    per_device = global_batch // batch_size_divisor(mesh)
    if len(starts) * per_device != rows.stop - rows.start:
        raise ValueError(f"this process's devices hold non-contiguous rows of the batch: {sorted(starts)}")
    return rows


def shard_batch(local_batch, mesh: Mesh):
    """Global arrays from this process's rows of the batch (a pytree of NumPy arrays).

    Each process passes its own rows, ``global[process_batch_rows(mesh, B)]``; the leading
    dimension of the result is the global batch, split over the batch axes.
    """
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
