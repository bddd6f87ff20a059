"""The training step: a pure function of the train state and a global batch, compiled with ``jax.jit``.

The model is split once, ``graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param,
...)``: the trainable parameters (what the optimiser updates), the frozen ones (a locked tower:
no gradient is even computed for them), and everything else (BatchNorm statistics, the dropout
streams' keys and counters). The step merges them back inside the jitted function, runs the
model in training mode, and returns the new state; the train state is the pytree
``{"params", "frozen", "rest", "opt", "step"}``.

What is trained is an :class:`~altjax.training.objectives.Objective`: ``features(model, batch)``
gives per-example arrays (leading axis the batch), ``loss(model, features, mesh)`` the scalar loss
and extra metrics of the whole batch. The step knows no model: any task's objective trains here.
The split lets gradient accumulation stay exact for a contrastive loss, whose negatives are the
whole batch (the GradCache scheme, open_clip's ``accum_freq``): the features of
all micro-batches are computed first without gradients, the loss and its gradient with respect to
the features are computed on the full batch, then each micro-batch is run again and its
features' cotangents are pulled back to the parameters. The gradient is the full batch's up to
float rounding, with the activations of one micro-batch in memory at a time. Micro-batch ``i``
takes the same rows from every device's part of the batch, so no data moves between devices.
BatchNorm differs in one respect: its running statistics receive one update per micro-batch.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from altjax.sharding import batch_axes, batch_size_divisor, process_batch_rows
from altjax.training.objectives import Objective


def split_model(model: nnx.Module, trainable) -> tuple:
    """``(graphdef, params, frozen, rest)`` (see the module docstring)."""
    return nnx.split(model, trainable, nnx.Param, ...)


def init_state(model: nnx.Module, trainable, tx: optax.GradientTransformation):
    """``(graphdef, train state)`` of a model (in the mode it will train in) and an optimiser."""
    graphdef, params, frozen, rest = split_model(model, trainable)
    return graphdef, {"params": params, "frozen": frozen, "rest": rest, "opt": tx.init(params),
                      "step": jnp.zeros((), jnp.int32)}


def batch_positions(global_batch: int, devices: int, accum_steps: int = 1) -> np.ndarray:
    """``positions[r]``: the place in the data's global order of the example that row ``r`` of the
    sharded global batch holds. Micro-batch ``i`` takes the ``i``-th chunk of every device's rows
    (:func:`_split_micro`, so that no data moves between devices); laying the examples out this
    way makes micro-batch ``i`` exactly the examples ``i * B / k ... (i + 1) * B / k - 1`` in order,
    whatever the number of devices, so that what a micro-batch computes (its dropout draws, its
    BatchNorm statistics) does not depend on the topology. Identity when ``accum_steps`` is 1."""
    k, n = accum_steps, devices
    if global_batch % (n * k):
        raise ValueError(f"global batch {global_batch} is not divisible by {n} devices x {k} accumulation steps")
    b = global_batch // (n * k)
    d, i, j = np.unravel_index(np.arange(global_batch), (n, k, b))
    return i * (n * b) + d * b + j


def process_batch_positions(mesh: Optional[Mesh], global_batch: int, accum_steps: int = 1) -> np.ndarray:
    """The positions (:func:`batch_positions`) of the rows of each global batch that this process
    loads, in the order of its rows: what its input pipeline reads."""
    if mesh is None:
        return batch_positions(global_batch, 1, accum_steps)
    rows = process_batch_rows(mesh, global_batch)
    return batch_positions(global_batch, batch_size_divisor(mesh), accum_steps)[rows]


def _split_micro(x, k: int, n: int):
    # Rows are laid out device by device; micro-batch i takes the i-th chunk of every device's rows.
    b = x.shape[0] // (n * k)
    return x.reshape((n, k, b) + x.shape[1:]).swapaxes(0, 1).reshape((k, n * b) + x.shape[1:])


def _merge_micro(x, k: int, n: int):
    b = x.shape[1] // n
    return x.reshape((k, n, b) + x.shape[2:]).swapaxes(0, 1).reshape((k * n * b,) + x.shape[2:])


def loss_and_grads(graphdef, objective: Objective, params, frozen, rest, batch, *, mesh: Optional[Mesh],
                   accum_steps: int = 1):
    """``(loss, metrics, grads, new rest)`` of one global batch, in ``accum_steps`` micro-batches."""

    # copy=True: the merged model's Variables must belong to the trace that mutates them (the
    # BatchNorm statistics and dropout counters change inside the differentiated function).
    def run(p, r, b):
        model = nnx.merge(graphdef, p, frozen, r, copy=True)
        feats = objective.features(model, b)
        return feats, nnx.state(model, nnx.Not(nnx.Param))

    def batch_loss(p, feats):
        return objective.loss(nnx.merge(graphdef, p, frozen, rest, copy=True), feats, mesh)

    if accum_steps == 1:
        def full(p):
            feats, new_rest = run(p, rest, batch)
            value, metrics = batch_loss(p, feats)
            return value, (metrics, new_rest)

        (value, (metrics, new_rest)), grads = jax.value_and_grad(full, has_aux=True)(params)
        return value, metrics, grads, new_rest

    k = accum_steps
    n = 1 if mesh is None else batch_size_divisor(mesh)
    constrain = (lambda x: x) if mesh is None else functools.partial(
        jax.lax.with_sharding_constraint, shardings=NamedSharding(mesh, P(None, batch_axes(mesh))))
    micro = jax.tree.map(lambda x: constrain(_split_micro(x, k, n)), batch)

    def forward(r, mb):
        feats, r = run(params, r, mb)
        return r, feats

    # Pass 1: every micro-batch's features, no residuals kept.
    new_rest, feats = jax.lax.scan(forward, rest, micro)
    feats = jax.tree.map(lambda x: _merge_micro(x, k, n), jax.lax.stop_gradient(feats))
    (value, metrics), (grads, feat_grads) = jax.value_and_grad(batch_loss, argnums=(0, 1), has_aux=True)(params, feats)
    feat_grads = jax.tree.map(lambda x: constrain(_split_micro(x, k, n)), feat_grads)

    def backward(carry, xs):
        r, acc = carry
        mb, cotangent = xs
        _, pull, r = jax.vjp(lambda p: run(p, r, mb), params, has_aux=True)
        return (r, jax.tree.map(jnp.add, acc, pull(cotangent)[0])), None

    # Pass 2: the same micro-batches again (the same dropout draws and BatchNorm statistics, since
    # the rest state is threaded identically), each pulling its features' cotangents back.
    (_, grads), _ = jax.lax.scan(backward, (rest, grads), (micro, feat_grads))
    return value, metrics, grads, new_rest


def make_train_step(graphdef, objective: Objective, tx: optax.GradientTransformation, *,
                    mesh: Optional[Mesh], accum_steps: int = 1, learning_rate: Optional[optax.Schedule] = None,
                    state_shardings=None, batch_sharding=None):
    """The jitted ``step(state, batch) -> (state, metrics)``; the input state is donated.

    ``metrics`` holds ``loss``, ``grad_norm``, ``update_norm`` (finite exactly when the new
    parameters are, barring overflow), the objective's metrics and, given the
    ``learning_rate`` schedule, the learning rate of this step. With ``state_shardings`` the
    output state has exactly the input's layout, so a restored state compiles the same program.
    """

    def step(state, batch):
        value, metrics, grads, rest = loss_and_grads(graphdef, objective, state["params"], state["frozen"],
                                                     state["rest"], batch, mesh=mesh, accum_steps=accum_steps)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
                   **metrics}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state["step"])
        new = {"params": params, "frozen": state["frozen"], "rest": rest, "opt": opt, "step": state["step"] + 1}
        return new, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None))
