"""The conversion engine: applies a mapping table between a PyTorch state dict and NNX parameters.

A table (``Table``) lists one ``Row`` per PyTorch tensor: its state-dict key, the dotted NNX path of
the matching variable, and the layout change between them. A row with an ``index`` maps its tensor
onto one slice of a stacked variable (layers created with a leading layer axis): the engine stacks
such rows on import and unstacks them on export, so one table serves both layouts. Each model
declares its own table, built from its config so that it lists exactly the keys that model has; the
row builders below name the tensors of the PyTorch modules towers are made of (``nn.Linear``,
``nn.LayerNorm``, ...). The engine
checks every key both ways and reports *all* problems at once: missing keys, unexpected keys and
shape mismatches, each named with both shapes. It knows no specific model.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from altjax.console import Progress

# Layout changes, as (PyTorch -> NNX, NNX -> PyTorch).
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda a: a, lambda a: a),
    # nn.Linear weight (out, in) <-> nnx.Linear kernel (in, out).
    "linear": (lambda a: a.T, lambda a: a.T),
    # Conv2d weight OIHW (depthwise: (C, 1, kh, kw)) <-> nnx.Conv kernel HWIO (depthwise: (kh, kw, 1, C)).
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # BatchNorm's num_batches_tracked: int32 in JAX (its default integer width), int64 in PyTorch.
    "counter": (lambda a: a.astype(np.int32), lambda a: a.astype(np.int64)),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One PyTorch tensor: state-dict key, NNX path, layout change, and for a stacked variable the
    position along its leading axis that this tensor fills (``None``: the variable is the tensor)."""

    torch: str
    nnx: str
    layout: str = "copy"
    index: int | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"row {self.torch!r}: unknown layout {self.layout!r}")


@dataclasses.dataclass(frozen=True)
class Table:
    """A model's mapping.

    ``rows`` use the in-memory PyTorch key spelling (``model.state_dict()``). ``aliases`` are regex
    rewrites from other spellings transformers accepts on load (legacy ``LayerNorm.gamma``, AltCLIP's
    on-disk ``encoder.layer.{i}``) to that spelling. ``ignore`` are regexes for keys dropped on
    import (non-persistent buffers that old checkpoints still contain). ``disk_renames`` are rewrites
    applied on export to give the spelling transformers writes to disk.
    """

    rows: tuple[Row, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    disk_renames: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        seen_t, seen_n = set(), set()
        for r in self.rows:
            if r.torch in seen_t or (r.nnx, r.index) in seen_n:
                raise ValueError(f"table lists {r.torch!r} / {r.nnx!r} twice")
            seen_t.add(r.torch)
            seen_n.add((r.nnx, r.index))
        stacks: dict[str, list[int | None]] = {}
        for r in self.rows:
            stacks.setdefault(r.nnx, []).append(r.index)
        for name, indices in stacks.items():
            if indices != [None] and sorted(-1 if i is None else i for i in indices) != list(range(len(indices))):
                raise ValueError(f"table stacks {name!r} from indices {indices}, expected 0 .. {len(indices) - 1}")


# Spellings transformers' loader accepts for every model (its global legacy renames).
LEGACY_ALIASES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))


def prefixed(rows: Iterable[Row], torch_prefix: str, nnx_prefix: str) -> list[Row]:
    """The rows of a sub-module placed under a parent module's prefixes."""
    return [dataclasses.replace(r, torch=torch_prefix + r.torch, nnx=nnx_prefix + r.nnx) for r in rows]


def repeated(rows: Iterable[Row], count: int, *, stacked: bool = False) -> list[Row]:
    """The rows of a repeated layer, ``"{i}"`` in each name replaced by 0 .. count - 1 in turn.

    With ``stacked`` the layers are one module whose variables have a leading layer axis: the NNX
    path loses its ``.{i}`` component and each row fills index i of the stacked variable.
    """
    rows = list(rows)
    if stacked:
        return [Row(r.torch.format(i=i), r.nnx.replace(".{i}", ""), r.layout, index=i)
                for i in range(count) for r in rows]
    return [Row(r.torch.format(i=i), r.nnx.format(i=i), r.layout) for i in range(count) for r in rows]


# The tensors of the PyTorch modules the towers are built from, under the module path ``name``
# (the same path on both sides: altjax's attribute names mirror the PyTorch module names).


def linear_rows(name: str, *, bias: bool = True) -> list[Row]:
    """``nn.Linear`` <-> ``nnx.Linear``: the weight transposed to a kernel, the bias copied."""
    rows = [Row(f"{name}.weight", f"{name}.kernel", "linear")]
    return rows + [Row(f"{name}.bias", f"{name}.bias")] if bias else rows


def layer_norm_rows(name: str) -> list[Row]:
    """``nn.LayerNorm`` <-> ``nnx.LayerNorm``: weight is the scale."""
    return [Row(f"{name}.weight", f"{name}.scale"), Row(f"{name}.bias", f"{name}.bias")]


def embedding_rows(name: str) -> list[Row]:
    """``nn.Embedding`` <-> ``nnx.Embed``."""
    return [Row(f"{name}.weight", f"{name}.embedding")]


def conv_rows(name: str, *, bias: bool = False) -> list[Row]:
    """``nn.Conv2d`` <-> ``nnx.Conv`` (or a depthwise kernel): OIHW <-> HWIO."""
    rows = [Row(f"{name}.weight", f"{name}.kernel", "conv")]
    return rows + [Row(f"{name}.bias", f"{name}.bias")] if bias else rows


def batch_norm_rows(name: str) -> list[Row]:
    """``nn.BatchNorm2d`` <-> altjax's BatchNorm: affine parameters, running statistics, and the
    ``num_batches_tracked`` counter (int64 in PyTorch, int32 here)."""
    return [
        Row(f"{name}.weight", f"{name}.scale"),
        Row(f"{name}.bias", f"{name}.bias"),
        Row(f"{name}.running_mean", f"{name}.mean"),
        Row(f"{name}.running_var", f"{name}.var"),
        Row(f"{name}.num_batches_tracked", f"{name}.num_batches_tracked", "counter"),
    ]


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def problems_message(problems: list[tuple[str, list[str]]]) -> str:
    """One line naming every problem: ``missing keys (2): a, b; shape mismatches (1): ...``; empty if none."""
    return "; ".join(_listing(title, items) for title, items in problems if items)


def _raise_if(problems: list[tuple[str, list[str]]], what: str) -> None:
    message = problems_message(problems)
    if message:
        raise ConversionError(f"{what}: {message}")


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d scalar (temperature, logit_scale) into shape (1,).
    return np.require(a, requirements="C")


def _rewrite(key: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _shape(tensors: Mapping[str, Any], key: str) -> tuple[int, ...]:
    # Lazy checkpoint readers answer shapes from the file header, without reading the tensor.
    return tuple(tensors.shape(key)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[key]))


@dataclasses.dataclass(frozen=True)
class _Stack:
    """Source tensors that become one stacked target, in index order."""

    keys: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class _Slice:
    """One index of a stacked source variable."""

    key: str
    index: int


class _Converted(Mapping[str, np.ndarray]):
    """Target key -> array, each converted from its source tensor(s) when looked up (never cached), so a
    caller that consumes and drops one tensor at a time holds one tensor, not a second model copy.

    A plan entry's source is a source key, ``None`` (a counter the checkpoint lacks: zero), a
    ``_Stack`` of keys or a ``_Slice`` of one.
    """

    def __init__(self, source: Mapping[str, Any], plan: dict[str, tuple[Any, Callable, tuple[int, ...]]]):
        self._source, self._plan = source, plan

    def _one(self, key: str | None, convert: Callable) -> np.ndarray:
        return convert(np.zeros((), np.int64) if key is None else self._source[key])

    def __getitem__(self, key: str) -> np.ndarray:
        source, convert, _ = self._plan[key]
        if isinstance(source, _Stack):
            return np.stack([self._one(k, convert) for k in source.keys])
        if isinstance(source, _Slice):
            return convert(np.asarray(self._source[source.key])[source.index])
        return self._one(source, convert)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._plan[key][2]

    def dtype(self, key: str) -> np.dtype:
        source, convert, _ = self._plan[key]
        if convert.layout == "counter":
            return convert(np.zeros((), np.int64)).dtype
        source_key = source.keys[0] if isinstance(source, _Stack) else source.key if isinstance(source, _Slice) else source
        if hasattr(self._source, "dtype"):
            return np.dtype(self._source.dtype(source_key))
        return np.asarray(self._source[source_key]).dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


def _converter(layout: str, direction: int) -> Callable[[Any], np.ndarray]:
    change = LAYOUTS[layout][direction]

    def convert(a):
        return _contiguous(change(np.asarray(a)))

    convert.layout = layout
    return convert


def torch_to_nnx(
    tensors: Mapping[str, Any],
    table: Table,
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str = "checkpoint",
    lazy: bool = False,
) -> Mapping[str, np.ndarray]:
    """Converts a PyTorch state dict (any mapping of key -> array, read lazily one key at a time).

    ``expected_shapes`` maps each NNX path to its shape in the target model. Every key and shape is
    checked first (shapes from file headers where the reader offers them). Returns NNX path -> NumPy
    array (the checkpoint's dtype): a dict, or with ``lazy`` a mapping that reads and converts each
    tensor when it is looked up (and never keeps it), so that a consumer dropping each tensor in
    turn holds one at a time. Raises ``ConversionError`` naming every missing, unexpected or wrongly shaped key
    (shapes given in the PyTorch layout, source vs expected).
    """
    canonical: dict[str, str] = {}
    duplicates = []
    for key in tensors.keys():
        if any(re.search(p, key) for p in table.ignore):
            continue
        name = _rewrite(key, LEGACY_ALIASES + table.aliases)
        if name in canonical:
            duplicates.append(f"{canonical[name]} and {key} (both mean {name})")
        canonical[name] = key
    rows = {r.torch: r for r in table.rows}
    # transformers starts a missing num_batches_tracked at 0 without complaint; so do we.
    absent_counters = [r for r in table.rows if r.torch not in canonical and r.layout == "counter"]
    missing = [r.torch for r in table.rows if r.torch not in canonical and r.layout != "counter"]
    unexpected = [canonical[k] for k in canonical if k not in rows]
    _raise_if(
        [("missing keys", missing), ("unexpected keys", unexpected), ("keys given twice", duplicates)],
        f"{source} does not match the model",
    )
    # Source key (None: an absent counter) of every row, by NNX path and index.
    found: dict[str, dict[int | None, str | None]] = {}
    for r in absent_counters:
        found.setdefault(r.nnx, {})[r.index] = None
    mismatched = []
    for name, key in canonical.items():
        row = rows[name]
        backward = LAYOUTS[row.layout][1]
        have = _shape(tensors, key)
        want = tuple(expected_shapes[row.nnx])
        if row.index is not None:
            want = want[1:]
        want_torch = tuple(backward(np.empty(want, dtype=np.uint8)).shape) if len(want) == len(have) else want
        if have != want_torch:
            mismatched.append(f"{key}: {source} has {have}, the model expects {want_torch}")
            continue
        found.setdefault(row.nnx, {})[row.index] = key
    _raise_if([("shape mismatches", mismatched)], f"{source} does not match the model")
    layouts = {r.nnx: r.layout for r in table.rows}
    plan: dict[str, tuple[Any, Callable, tuple[int, ...]]] = {}
    for name, keys in found.items():
        plan[name] = (keys[None] if None in keys else _Stack(tuple(keys[i] for i in range(len(keys)))),
                      _converter(layouts[name], 0), tuple(expected_shapes[name]))
    converted = _Converted(tensors, plan)
    return converted if lazy else dict(converted)


def nnx_to_torch(params: Mapping[str, Any], table: Table, *, on_disk: bool = True,
                 lazy: bool = False) -> Mapping[str, np.ndarray]:
    """Converts NNX parameters (dotted path -> array) to a PyTorch state dict of NumPy arrays.

    With ``on_disk`` the keys take the spelling transformers writes to disk (``table.disk_renames``);
    otherwise the in-memory ``state_dict()`` spelling. Returns a dict in table order, or with
    ``lazy`` a mapping that converts each tensor when it is looked up (with ``shape``/``dtype``
    answered without converting), so a writer streaming it holds one tensor at a time. Lazy values
    are fresh arrays on every lookup: hand a consumer that keeps raw pointers (safetensors'
    ``save_file``) the dict, not the lazy mapping.
    """
    needed = {r.nnx for r in table.rows}
    missing = sorted(needed - set(params))
    unexpected = sorted(set(params) - needed)
    _raise_if([("missing parameters", missing), ("unexpected parameters", unexpected)], "model does not match the table")
    plan: dict[str, tuple[Any, Callable, tuple[int, ...]]] = {}
    for row in table.rows:
        key = _rewrite(row.torch, table.disk_renames) if on_disk else row.torch
        backward = LAYOUTS[row.layout][1]
        shape = _shape(params, row.nnx)
        if row.index is not None:
            shape = shape[1:]
        shape = tuple(backward(np.empty(shape, dtype=np.uint8)).shape)
        plan[key] = (row.nnx if row.index is None else _Slice(row.nnx, row.index), _converter(row.layout, 1), shape)
    converted = _Converted(params, plan)
    return converted if lazy else dict(converted)


# --- NNX models as flat dicts ---------------------------------------------------------------------


def _is_weight(variable: Any) -> bool:
    from flax import nnx

    return isinstance(variable, (nnx.Param, nnx.BatchStat))


def model_variables(model: Any) -> dict[str, Any]:
    """Dotted path -> ``nnx.Variable`` for every parameter and BatchNorm statistic of ``model``."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model))
    return {".".join(str(p) for p in path): var for path, var in flat if _is_weight(var)}


class LazyVariables(Mapping[str, np.ndarray]):
    """Dotted path -> NumPy array of ``model_variables``, fetched from the device when looked up."""

    def __init__(self, variables: Mapping[str, Any]):
        self._variables = variables

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._variables[key].get_value())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._variables[key].get_value().shape)

    def dtype(self, key: str):
        return self._variables[key].get_value().dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self._variables)

    def __len__(self) -> int:
        return len(self._variables)


def model_params(model: Any) -> dict[str, np.ndarray]:
    """Dotted path -> NumPy array for every parameter and BatchNorm statistic of ``model``."""
    return {k: np.asarray(v.get_value()) for k, v in model_variables(model).items()}


def model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in model_variables(model).items()}


def load_params(model: Any, params: Mapping[str, Any], *, sharding: Callable | None = None,
                progress: bool = False) -> None:
    """Writes ``params`` (dotted path -> array) into ``model`` in place, cast to each variable's dtype.

    Every parameter of the model must be given, and nothing else; shapes must match. ``params`` is
    read one entry at a time, so a lazy mapping (``torch_to_nnx``) keeps one tensor on the host at
    once. ``sharding(path, shape)``, if given, returns the ``jax.sharding.Sharding`` to place each
    parameter in; each device then receives only its own slice.
    """
    import jax
    import jax.numpy as jnp

    variables = model_variables(model)
    missing = sorted(set(variables) - set(params))
    unexpected = sorted(set(params) - set(variables))
    bad = [
        f"{k}: given {_shape(params, k)}, the model has {tuple(variables[k].get_value().shape)}"
        for k in variables
        if k in params and _shape(params, k) != tuple(variables[k].get_value().shape)
    ]
    _raise_if(
        [("missing parameters", missing), ("unexpected parameters", unexpected), ("shape mismatches", bad)],
        "parameters do not match the model",
    )
    with Progress(len(variables), "loading parameters", unit="tensors", enabled=progress) as bar:
        for k, var in variables.items():
            dtype = var.get_value().dtype
            value = params[k]
            if sharding is None:
                var.set_value(jnp.asarray(value, dtype=dtype))
            elif isinstance(value, jax.Array) and value.sharding == sharding(k, value.shape):
                var.set_value(value.astype(dtype))
            else:
                host = np.asarray(value).astype(dtype, copy=False)
                var.set_value(jax.make_array_from_callback(host.shape, sharding(k, host.shape), lambda idx: host[idx]))
            del value
            bar.update()
