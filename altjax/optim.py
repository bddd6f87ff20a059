"""Optimisers for contrastive training: LAMB (ALIGN) and AdamW (AltCLIP), warmup + decay schedules,
weight-decay masks, gradient clipping, and which parameters are trainable.

Everything is read from the ``optimizer`` part of a training config (see ``configs/``):

``name``            "lamb" or "adamw"
``learning_rate``   peak learning rate
``warmup_steps``    linear warmup from 0 to the peak
``decay``           "linear", "cosine" or "constant" after the warmup, to ``end_factor * peak`` at ``total_steps``
``weight_decay``    decoupled weight decay, applied only where :func:`decay_mask` says
``no_decay``        regex on parameter paths that never decay (default: norms, biases, the logit scalars)
``b1``, ``b2``, ``eps``
``grad_clip_norm``  clip the global gradient norm to this (0 or None: no clipping)
"""
from __future__ import annotations

import re
from typing import Any

import jax
import optax

from altjax.sharding import path_to_str

# Norm parameters (LayerNorm and BatchNorm scale/bias, named so in every altjax tower), every bias,
# and ALIGN's temperature / CLIP's logit scale and bias are not decayed: decaying a norm's scale or the temperature pulls them towards
# 0, which changes what the network computes instead of regularising it.
DEFAULT_NO_DECAY = r"(^|/)(bias|scale|temperature|logit_scale|logit_bias)$"

OPTIMIZERS = ("lamb", "adamw")
DECAYS = ("linear", "cosine", "constant")


def schedule(opt: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``opt.learning_rate`` over ``opt.warmup_steps``, then ``opt.decay`` to
    ``opt.end_factor * learning_rate`` at ``total_steps``."""
    peak = float(opt.learning_rate)
    warmup = int(opt.get("warmup_steps", 0))
    end = peak * float(opt.get("end_factor", 0.0))
    decay = opt.get("decay", "linear")
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


def decay_mask(params, no_decay: str = DEFAULT_NO_DECAY):
    """A tree like ``params`` of bools: True where weight decay applies. A parameter decays when it
    has at least two dimensions (kernels, embeddings) and its path does not match ``no_decay``."""
    pattern = re.compile(no_decay) if no_decay else None

    def decays(path, leaf) -> bool:
        name = path_to_str(path)
        return leaf.ndim >= 2 and not (pattern is not None and pattern.search(name))

    return jax.tree_util.tree_map_with_path(decays, params)


def build(opt: Any, total_steps: int, params) -> optax.GradientTransformation:
    """The optax transformation for the trainable ``params`` (gradient clipping first)."""
    name = opt.get("name", "lamb")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
    lr = schedule(opt, total_steps)
    mask = decay_mask(params, opt.get("no_decay", DEFAULT_NO_DECAY))
    common = dict(learning_rate=lr, b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.999)),
                  weight_decay=float(opt.get("weight_decay", 0.0)), mask=mask)
    if name == "lamb":
        tx = optax.lamb(eps=float(opt.get("eps", 1e-6)), **common)
    else:
        tx = optax.adamw(eps=float(opt.get("eps", 1e-8)), **common)
    clip = opt.get("grad_clip_norm", None)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    return tx


def trainable_filter(freeze: str):
    """An nnx filter selecting the parameters that train: every ``nnx.Param`` whose path does not
    match the regex ``freeze`` (LiT's locked image tower: ``freeze="^vision_model/"``)."""
    from flax import nnx

    pattern = re.compile(freeze) if freeze else None

    def trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        return pattern is None or not pattern.search("/".join(str(p) for p in path))

    return trainable
