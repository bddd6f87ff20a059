"""Optimisers for contrastive training: LAMB (ALIGN) and AdamW (AltCLIP), warmup + decay schedules,
weight-decay masks, gradient clipping, and which parameters are trainable.

Stacked layers (a tower built with ``scan_layers``, see :func:`altjax.sharding.layer_axis`) train
as the unrolled ones do: LAMB's trust ratio and the weight-decay mask look at each layer's slice of
a stacked parameter, not at the whole stack. AdamW is elementwise, so stacking does not change it.

Everything is read from the ``optimizer`` part of a training config (see ``configs/``, where every
value has its default):

``name``            "lamb" or "adamw"
``learning_rate``   peak learning rate
``warmup_steps``    linear warmup from 0 to the peak
``decay``           "linear", "cosine" or "constant" after the warmup, to ``end_factor * peak`` at ``total_steps``
``weight_decay``    decoupled weight decay, applied only where :func:`decay_mask` says
``no_decay``        regex on parameter paths that never decay (the recipes': norms, biases, the logit
                    scalars; decaying a norm's scale or the temperature pulls it towards 0, which
                    changes what the network computes instead of regularising it)
``b1``, ``b2``, ``eps``
``grad_clip_norm``  clip the global gradient norm to this (0: no clipping)
"""
from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import nnx

from altjax.sharding import layer_axis, path_to_str

OPTIMIZERS = ("lamb", "adamw")
DECAYS = ("linear", "cosine", "constant")


def schedule(opt: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``opt.learning_rate`` over ``opt.warmup_steps``, then ``opt.decay`` to
    ``opt.end_factor * learning_rate`` at ``total_steps``."""
    peak = float(opt.learning_rate)
    warmup = int(opt.warmup_steps)
    end = peak * float(opt.end_factor)
    decay = opt.decay
    if decay not in DECAYS:
        raise ValueError(f"optimizer.decay must be one of {DECAYS}, got {decay!r}")
    rest = max(int(total_steps) - warmup, 1)
    if decay == "linear":
        after = optax.linear_schedule(peak, end, rest)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=end / peak if peak else 0.0)
    else:
        after = optax.constant_schedule(peak)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params, no_decay: str):
    """A tree like ``params`` of bools: True where weight decay applies. A parameter decays when it
    has at least two dimensions (kernels, embeddings), not counting the layer axis of stacked
    layers, and its path does not match ``no_decay``."""
    pattern = re.compile(no_decay) if no_decay else None

    def decays(path, leaf) -> bool:
        name = path_to_str(path)
        ndim = leaf.ndim - (layer_axis(name) is not None)
        return ndim >= 2 and not (pattern is not None and pattern.search(name))

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_layerwise_trust_ratio(min_norm: float = 0.0, trust_coefficient: float = 1.0,
                                   eps: float = 0.0) -> optax.GradientTransformation:
    """``optax.scale_by_trust_ratio`` with one ratio per layer for stacked parameters.

    optax takes ``||param|| / ||update||`` over a whole leaf; for a stacked leaf that would be one
    ratio for all its layers, where the unrolled model has one per layer. So a stacked leaf's ratio
    is optax's own, mapped over its layer axis (:func:`altjax.sharding.layer_axis`), and every other
    leaf is scaled by optax's transformation itself. The state is optax's (empty), so a checkpoint
    of ``optax.lamb``'s state fits :func:`lamb`'s.
    """
    per_leaf = optax.scale_by_trust_ratio(min_norm=min_norm, trust_coefficient=trust_coefficient, eps=eps)

    def scale(update, param):
        return per_leaf.update(update, optax.EmptyState(), param)[0]

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("the layerwise trust ratio needs the parameters: pass them to update()")

        def one(path, update, param):
            axis = layer_axis(path)
            if axis is None:
                return scale(update, param)
            return jax.vmap(scale, in_axes=axis, out_axes=axis)(update, param)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(per_leaf.init, update_fn)


def lamb(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
         eps_root: float = 0.0, weight_decay: float = 0.0, mask: Any = None) -> optax.GradientTransformation:
    """``optax.lamb``, with the trust ratio taken per layer for stacked layers
    (:func:`scale_by_layerwise_trust_ratio`); the same chain, so the same state."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        optax.add_decayed_weights(weight_decay=weight_decay, mask=mask),
        scale_by_layerwise_trust_ratio(),
        optax.scale_by_learning_rate(learning_rate),
    )


def build(opt: Any, total_steps: int, params) -> optax.GradientTransformation:
    """The optax transformation for the trainable ``params`` (gradient clipping first)."""
    name = opt.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
    lr = schedule(opt, total_steps)
    mask = decay_mask(params, opt.no_decay)
    common = dict(learning_rate=lr, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                  weight_decay=float(opt.weight_decay), mask=mask)
    tx = lamb(**common) if name == "lamb" else optax.adamw(**common)
    clip = opt.grad_clip_norm
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    return tx


def trainable_filter(freeze: str):
    """An nnx filter selecting the parameters that train: every ``nnx.Param`` whose path does not
    match the regex ``freeze`` (LiT's locked image tower: ``freeze="^vision_model/"``)."""
    pattern = re.compile(freeze) if freeze else None

    def trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        return pattern is None or not pattern.search("/".join(str(p) for p in path))

    return trainable
