"""The conversion engine: applies a mapping table between a PyTorch state dict and NNX parameters.

A table (``Table``) lists one ``Row`` per PyTorch tensor: its state-dict key, the dotted NNX path of
the matching variable, and the layout change between them. Per-model tables live beside this file
(``align.py``, ``altclip.py``, ...) and are built from a model config, so they list exactly the
keys that model has. The engine checks every key both ways and reports *all* problems at once:
missing keys, unexpected keys and shape mismatches, each named with both shapes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# Layout changes, as (PyTorch -> NNX, NNX -> PyTorch).
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda a: a, lambda a: a),
    # nn.Linear weight (out, in) <-> nnx.Linear kernel (in, out).
    "linear": (lambda a: a.T, lambda a: a.T),
    # Conv2d weight OIHW (depthwise: (C, 1, kh, kw)) <-> nnx.Conv kernel HWIO (depthwise: (kh, kw, 1, C)).
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
}
# A PyTorch-only buffer (BatchNorm's num_batches_tracked): ignored on import, written as 0 on export.
COUNTER = "counter"


@dataclasses.dataclass(frozen=True)
class Row:
    """One PyTorch tensor: state-dict key, NNX path (None for a PyTorch-only counter), layout change."""

    torch: str
    nnx: str | None
    layout: str = "copy"

    def __post_init__(self):
        if self.layout not in LAYOUTS and self.layout != COUNTER:
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
            if r.torch in seen_t or (r.nnx is not None and r.nnx in seen_n):
                raise ValueError(f"table lists {r.torch!r} / {r.nnx!r} twice")
            seen_t.add(r.torch)
            if r.nnx is not None:
                seen_n.add(r.nnx)


# Spellings transformers' loader accepts for every model (its global legacy renames).
LEGACY_ALIASES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))


def prefixed(rows: Iterable[Row], torch_prefix: str, nnx_prefix: str) -> list[Row]:
    """The rows of a sub-module placed under a parent module's prefixes."""
    return [
        Row(torch_prefix + r.torch, None if r.nnx is None else nnx_prefix + r.nnx, r.layout) for r in rows
    ]


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


def _listing(title: str, items: list[str], limit: int = 25) -> str:
    shown = "\n".join(f"    {s}" for s in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _raise_if(problems: list[tuple[str, list[str]]], what: str) -> None:
    problems = [(t, items) for t, items in problems if items]
    if problems:
        raise ConversionError(f"{what}:\n" + "\n".join(_listing(t, items) for t, items in problems))


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d scalar (temperature, logit_scale) into shape (1,).
    return np.require(a, requirements="C")


def _rewrite(key: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def torch_to_nnx(
    tensors: Mapping[str, Any],
    table: Table,
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """Converts a PyTorch state dict (any mapping of key -> array, read lazily one key at a time).

    ``expected_shapes`` maps each NNX path to its shape in the target model. Returns NNX path ->
    NumPy array in the checkpoint's dtype. Raises ``ConversionError`` naming every missing,
    unexpected or wrongly shaped key (shapes given in the PyTorch layout, source vs expected).
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
    missing = [r.torch for r in table.rows if r.torch not in canonical and r.layout != COUNTER]
    unexpected = [canonical[k] for k in canonical if k not in rows]
    _raise_if(
        [("missing keys", missing), ("unexpected keys", unexpected), ("keys given twice", duplicates)],
        f"{source} does not match the model",
    )
    out: dict[str, np.ndarray] = {}
    mismatched = []
    for name, key in canonical.items():
        row = rows[name]
        if row.layout == COUNTER:
            continue
        forward, backward = LAYOUTS[row.layout]
        value = np.asarray(tensors[key])
        want = tuple(expected_shapes[row.nnx])
        if value.ndim != len(want) or tuple(forward(value).shape) != want:
            want_torch = tuple(backward(np.empty(want, dtype=np.uint8)).shape) if len(want) == value.ndim else want
            mismatched.append(f"{key}: {source} has {tuple(value.shape)}, the model expects {want_torch}")
            continue
        out[row.nnx] = _contiguous(forward(value))
    _raise_if([("shape mismatches", mismatched)], f"{source} does not match the model")
    return out


def nnx_to_torch(params: Mapping[str, Any], table: Table, *, on_disk: bool = True) -> dict[str, np.ndarray]:
    """Converts NNX parameters (dotted path -> array) to a PyTorch state dict of NumPy arrays.

    With ``on_disk`` the keys take the spelling transformers writes to disk (``table.disk_renames``);
    otherwise the in-memory ``state_dict()`` spelling.
    """
    needed = {r.nnx for r in table.rows if r.nnx is not None}
    missing = sorted(needed - set(params))
    unexpected = sorted(set(params) - needed)
    _raise_if([("missing parameters", missing), ("unexpected parameters", unexpected)], "model does not match the table")
    out: dict[str, np.ndarray] = {}
    for row in table.rows:
        key = _rewrite(row.torch, table.disk_renames) if on_disk else row.torch
        if row.layout == COUNTER:
            out[key] = np.zeros((), dtype=np.int64)
            continue
        out[key] = _contiguous(LAYOUTS[row.layout][1](np.asarray(params[row.nnx])))
    return out


# --- NNX models as flat dicts -------------------------------------------------------------------


def _is_weight(variable: Any) -> bool:
    from flax import nnx

    return isinstance(variable, (nnx.Param, nnx.BatchStat))


def model_variables(model: Any) -> dict[str, Any]:
    """Dotted path -> ``nnx.Variable`` for every parameter and BatchNorm statistic of ``model``."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model))
    return {".".join(str(p) for p in path): var for path, var in flat if _is_weight(var)}


def model_params(model: Any) -> dict[str, np.ndarray]:
    """Dotted path -> NumPy array for every parameter and BatchNorm statistic of ``model``."""
    return {k: np.asarray(v.get_value()) for k, v in model_variables(model).items()}


def model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in model_variables(model).items()}


def load_params(model: Any, params: Mapping[str, Any]) -> None:
    """Writes ``params`` (dotted path -> array) into ``model`` in place, cast to each variable's dtype.

    Every parameter of the model must be given, and nothing else; shapes must match.
    """
    import jax.numpy as jnp

    variables = model_variables(model)
    missing = sorted(set(variables) - set(params))
    unexpected = sorted(set(params) - set(variables))
    bad = [
        f"{k}: given {tuple(np.shape(params[k]))}, the model has {tuple(variables[k].get_value().shape)}"
        for k in variables
        if k in params and tuple(np.shape(params[k])) != tuple(variables[k].get_value().shape)
    ]
    _raise_if(
        [("missing parameters", missing), ("unexpected parameters", unexpected), ("shape mismatches", bad)],
        "parameters do not match the model",
    )
    for k, var in variables.items():
        var.set_value(jnp.asarray(params[k], dtype=var.get_value().dtype))
