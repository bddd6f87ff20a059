"""The training step: a pure function of the train state and a global batch, compiled with ``jax.jit``.

The model is split once, ``graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param,
...)``: the trainable parameters (what the optimiser updates), the frozen ones (a locked tower:
no gradient is even computed for them), and everything else (BatchNorm statistics, the dropout
streams' keys and counters). The step merges them back inside the jitted function, runs the
model in training mode, and returns the new state; the train state is the pytree
``{"params", "frozen", "rest", "opt", "step"}``.

What is trained is an :class:`Objective`: ``features(model, batch)`` gives per-example arrays
(leading axis the batch), ``loss(model, features, mesh)`` the scalar loss and extra metrics of the
whole batch. The split lets gradient accumulation stay exact for a contrastive loss, whose
negatives are the whole batch (the GradCache scheme, open_clip's ``accum_freq``): the features of
all micro-batches are computed first without gradients, the loss and its gradient with respect to
the features are computed on the full batch, then each micro-batch is run again and its
features' cotangents are pulled back to the parameters. The gradient is the full batch's up to
float rounding, with the activations of one micro-batch in memory at a time. Micro-batch ``i``
takes the same rows from every device's part of the batch, so no data moves between devices.
BatchNorm differs in one respect: its running statistics receive one update per micro-batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from altjax import losses
from altjax.models import layers
from altjax.sharding import batch_axes, batch_size_divisor

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step minimises.

    ``features(model, batch)``: a pytree of per-example arrays, leading axis the batch.
    ``loss(model, features, mesh)``: ``(loss, metrics)`` for the whole batch's features; ``mesh``
    is the device mesh the features are split over (None: one device).
    ``chance(batch_size)``: the loss of a model that has learned nothing (a contrastive loss's
    value for uniform predictions), or None where no such level exists (a regression).
    """

    features: Callable[[nnx.Module, dict], Any]
    loss: Callable[[nnx.Module, Any, Optional[Mesh]], tuple[jax.Array, dict[str, jax.Array]]]
    chance: Optional[Callable[[int], float]] = None


def _remat(fn, policy: Optional[str]):
    if policy is None:
        return fn
    return nnx.remat(fn, policy=getattr(jax.checkpoint_policies, policy))


def align_objective(*, kind: str = "softmax", label_smoothing: float = 0.1, learn_temperature: bool = True,
                    impl: str = "gather", remat_policy: Optional[str] = None) -> Objective:
    """ALIGN's loss: the symmetric softmax cross-entropy of the normalised embeddings with logits
    divided by the learned ``temperature`` and label smoothing (ALIGN: 0.1). ``kind="sigmoid"``
    swaps in SigLIP's loss at the same scale, with the bias :func:`logit_bias` (learned when the
    trainer attached one, :func:`attach_logit_bias`); label smoothing does not apply to it.
    ``learn_temperature=False`` holds ``temperature`` at its value (no gradient reaches it). ``impl`` picks the sharded loss ("gather" or "ring", see
    :mod:`altjax.losses`). ``remat_policy``, the name of a ``jax.checkpoint_policies`` policy
    ("nothing_saveable": recompute everything), rematerialises each tower separately in the
    backward pass; None stores the activations."""

    image_features = _remat(lambda m, x: m.get_image_features(x), remat_policy)
    text_features = _remat(lambda m, ids, mask, types: m.get_text_features(ids, mask, types), remat_policy)

    def features(model, batch):
        image = image_features(model, batch["pixel_values"])
        text = text_features(model, batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        return normalised(image, text)

    return contrastive_objective(features, lambda model: 1.0 / model.temperature[...], kind=kind,
                                 label_smoothing=label_smoothing, learn_temperature=learn_temperature, impl=impl)


def normalised(image, text) -> dict[str, jax.Array]:
    """The features a contrastive objective works on: both towers' embeddings, L2-normalised in fp32."""
    return {"image_embeds": layers.l2_normalize(image.astype(jnp.float32)),
            "text_embeds": layers.l2_normalize(text.astype(jnp.float32))}


def contrastive_objective(features, logit_scale, *, kind: str, label_smoothing: float, learn_temperature: bool,
                          impl: str) -> Objective:
    """The contrastive loss of ``features(model, batch)`` (:func:`normalised` embeddings) with logits
    scaled by ``logit_scale(model)`` (ALIGN: ``1 / temperature``, CLIP: ``exp(logit_scale)``):
    :func:`altjax.losses.contrastive_loss`, sharded over the mesh. ``kind="sigmoid"`` adds the
    bias :func:`logit_bias`; label smoothing applies to the softmax loss only.
    ``learn_temperature=False`` holds the scale (no gradient reaches its parameter). Metrics:
    ``temperature`` (1 / scale) and, for the sigmoid loss, ``logit_bias``."""

    def loss(model, feats, mesh):
        scale = logit_scale(model)
        if not learn_temperature:
            scale = jax.lax.stop_gradient(scale)
        bias = logit_bias(model) if kind == "sigmoid" else None
        value = losses.contrastive_loss(
            feats["image_embeds"], feats["text_embeds"], kind=kind, logit_scale=scale, logit_bias=bias,
            label_smoothing=label_smoothing if kind == "softmax" else 0.0, mesh=mesh, impl=impl)
        return value, {"temperature": 1.0 / scale, **({"logit_bias": bias} if kind == "sigmoid" else {})}

    return Objective(features, loss, chance=functools.partial(losses.chance_loss, kind))


# The attribute a run of the sigmoid loss adds to the model it trains (see attach_logit_bias).
LOGIT_BIAS = "logit_bias"


def attach_logit_bias(model: nnx.Module, value: float = losses.SIGLIP_LOGIT_BIAS) -> None:
    """Gives ``model`` a learnable scalar ``logit_bias`` (SigLIP's ``b``, initialised at -10) for
    the sigmoid loss. ALIGN and AltCLIP have no such parameter, so the trainer attaches it for the
    run (it is trained and checkpointed with the model) and :func:`detach_logit_bias` removes it
    from what is exported, which stays an ordinary checkpoint of the reference architecture."""
    setattr(model, LOGIT_BIAS, nnx.Param(jnp.asarray(value, jnp.float32)))


def detach_logit_bias(model: nnx.Module) -> nnx.Module:
    if hasattr(model, LOGIT_BIAS):
        delattr(model, LOGIT_BIAS)
    return model


def logit_bias(model: nnx.Module):
    """The model's attached ``logit_bias``, else SigLIP's initial value held fixed."""
    bias = getattr(model, LOGIT_BIAS, None)
    return losses.SIGLIP_LOGIT_BIAS if bias is None else bias[...]


def objective_from_config(config) -> Objective:
    """The objective named by ``config.loss.name``: ``"align"``, or AltCLIP's ``"distill"`` (phase 1)
    and ``"clip"`` (phase 2, and CLIP) from :mod:`altjax.distill`."""
    name = config.loss.name
    if name == "align":
        return align_objective(kind=config.loss.get("kind", "softmax"), label_smoothing=float(config.loss.label_smoothing),
                               learn_temperature=bool(config.loss.get("learn_temperature", True)),
                               impl=config.loss.impl, remat_policy=config.remat_policy if config.remat else None)
    if name in ("distill", "clip"):
        from altjax import distill

        return distill.objective(config)
    raise ValueError(f"unknown loss {name!r}; known: 'align', 'distill', 'clip'")


def split_model(model: nnx.Module, trainable) -> tuple:
    """``(graphdef, params, frozen, rest)`` (see the module docstring)."""
    return nnx.split(model, trainable, nnx.Param, ...)


def init_state(model: nnx.Module, trainable, tx: optax.GradientTransformation):
    """``(graphdef, train state)`` of a model (in the mode it will train in) and an optimiser."""
    graphdef, params, frozen, rest = split_model(model, trainable)
    return graphdef, {"params": params, "frozen": frozen, "rest": rest, "opt": tx.init(params),
                      "step": jnp.zeros((), jnp.int32)}


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
