"""BatchNorm with PyTorch's ``BatchNorm2d`` semantics and a hand-written training gradient.

``BatchNorm`` normalises over the last (channel) axis, with PyTorch's momentum convention, its
unbiased running-variance update, and optional per-group statistics (per-replica BatchNorm).
``batch_norm_train`` is its training-mode kernel, a ``jax.custom_vjp`` whose backward pass is the
closed form instead of autodiff's.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm2d default momentum (its convention: the weight of the new batch statistic).
TORCH_DEFAULT_BN_MOMENTUM = 0.1


class BatchNorm(nnx.Module):
    """BatchNorm over the last (channel) axis with PyTorch's ``BatchNorm2d`` semantics.

    Parameters ``scale`` and ``bias``, statistics ``mean``, ``var`` and ``num_batches_tracked`` (PyTorch's
    counter: unused by the normalisation since the momentum is set, but kept so that a checkpoint
    goes through altjax and back unchanged, and incremented by each training call as PyTorch does). ``momentum`` is in PyTorch's
    convention, ``running = (1 - momentum) * running + momentum * batch`` (Flax's is the complement).
    With ``use_running_average`` (eval mode, the default) it normalises with the running statistics.
    Otherwise it normalises with the batch mean and *biased* variance and updates the running
    variance with the *unbiased* one (``n / (n - 1)``), as PyTorch does. Statistics and the
    normalisation are computed in float32 whatever the input dtype; the output has ``dtype``. The
    training-mode gradient is written out (``batch_norm_train``) rather than left to autodiff.

    ``group_size``: batch statistics over groups of that many consecutive examples, each group
    normalised with its own statistics (per-replica BatchNorm). The running statistics are then
    updated with the mean over groups of the group mean and of the group's unbiased variance. As the
    update is linear, this equals averaging the buffers that each replica would hold after updating
    from its own group, which is the deterministic reading of unsynchronised per-replica buffers.
    ``None`` uses the whole batch.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = TORCH_DEFAULT_BN_MOMENTUM,
        group_size: Optional[int] = None,
        use_running_average: bool = True,
        dtype=jnp.float32,
    ):
        # No rngs: the initialisation is deterministic (scale 1, bias 0, mean 0, var 1), as PyTorch's.
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        # int32: JAX's default integer width (PyTorch's int64 is restored on export).
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.group_size = group_size
        self.use_running_average = use_running_average
        self.dtype = dtype

    def set_view(self, use_running_average: Optional[bool] = None):
        """Used by ``nnx.view``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.scale[...], self.bias[...]
        if self.use_running_average:
            x = x.astype(jnp.float32)
            y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps) * scale + bias
            return y.astype(self.dtype)
        batch = x.shape[0]
        group = batch if self.group_size is None else self.group_size
        if batch % group:
            raise ValueError(f"BatchNorm group_size {group} does not divide the batch size {batch}")
        n = math.prod(x.shape[1:-1]) * group
        if n < 2:
            raise ValueError(f"BatchNorm needs more than one value per channel in training, got {n} (input {x.shape})")
        y = batch_norm_train(x, scale, bias, self.eps, group)
        # The same statistics as inside batch_norm_train (XLA computes them once).
        mean, var = jax.lax.stop_gradient(_group_statistics(x, group))
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * mean.mean(axis=0)
        self.var[...] = (1 - m) * self.var[...] + m * (var * (n / (n - 1))).mean(axis=0)
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return y.astype(self.dtype)


def _grouped(x: jax.Array, group: int) -> jax.Array:
    """``x`` (B, ..., C) in float32 as (B / group, group, ..., C)."""
    return x.astype(jnp.float32).reshape((x.shape[0] // group, group) + x.shape[1:])


def _group_statistics(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Per group of ``group`` consecutive examples: the mean and the biased variance, each (B / group, C)."""
    xg = _grouped(x, group)
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes)
    # Two-pass variance: the one-pass E[x^2] - E[x]^2 loses digits when |mean| >> std.
    var = jnp.mean(jnp.square(xg - _expand(mean, xg)), axis=axes)
    return mean, var


def _expand(stat: jax.Array, xg: jax.Array) -> jax.Array:
    """A per-group statistic (G, C) broadcastable against grouped ``xg`` (G, group, ..., C)."""
    return stat.reshape((stat.shape[0],) + (1,) * (xg.ndim - 2) + (stat.shape[1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, group: int) -> jax.Array:
    """Training-mode BatchNorm: ``(x - mean) * rsqrt(var + eps) * scale + bias`` in float32, with the
    mean and biased variance over each group of ``group`` consecutive examples (and all positions).

    The gradient is the closed form (per group, ``n`` values per channel, ``xhat`` the normalised
    input): ``dx = rsqrt(var + eps) * scale * (dy - mean(dy) - xhat * mean(dy * xhat))``. JAX's
    autodiff of the forward gives the same numbers but keeps ``x - mean`` and ``xhat`` as
    activation-sized residuals and makes several more passes over them; here the residual is ``x``
    alone and the backward is two reductions and one element-wise pass.
    """
    return _batch_norm_train_fwd(x, scale, bias, eps, group)[0]


def _batch_norm_train_fwd(x, scale, bias, eps, group):
    xg = _grouped(x, group)
    mean, var = _group_statistics(x, group)
    rstd = jax.lax.rsqrt(var + eps)
    y = (xg - _expand(mean, xg)) * _expand(rstd, xg) * scale + bias
    return y.reshape(x.shape), (x, scale, mean, rstd)


def _batch_norm_train_bwd(eps, group, residuals, dy):
    x, scale, mean, rstd = residuals
    xg = _grouped(x, group)
    dyg = dy.reshape(xg.shape)
    axes = tuple(range(1, xg.ndim - 1))
    n = math.prod(xg.shape[a] for a in axes)
    xhat = (xg - _expand(mean, xg)) * _expand(rstd, xg)
    sum_dy = jnp.sum(dyg, axis=axes)
    sum_dy_xhat = jnp.sum(dyg * xhat, axis=axes)
    dx = (_expand(rstd, xg) * scale) * (dyg - _expand(sum_dy / n, xg) - xhat * _expand(sum_dy_xhat / n, xg))
    return dx.reshape(x.shape).astype(x.dtype), sum_dy_xhat.sum(axis=0), sum_dy.sum(axis=0)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)
