"""EfficientNet, the image tower of ALIGN (transformers' ``AlignVisionModel``).

A stem (fixed (0, 1) zero padding, 3x3 stride-2 conv, BatchNorm, swish) followed by MBConv blocks
(optional 1x1 expansion, depthwise conv, squeeze-excite, 1x1 projection, residual on repeats) and a
global pooling. Unlike transformers' ``EfficientNetModel`` there is no top conv: the pooled last
block is the image feature. Module attribute names mirror the PyTorch module names
(``embeddings.convolution``, ``encoder.blocks[i].depthwise_conv.depthwise_norm``, ...) so that the
table in ``altjax/conversion/efficientnet.py`` reads as a plain rename.

Images are NHWC. Every padding is explicit and equals the reference's: PyTorch's stride-2 layers
pad a fixed (0, 1) / (1, 2), which no "SAME" rule reproduces for every input size.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.models import inputs, layers
from altjax.models.configuration import config_from_hf, config_to_hf
from altjax.models.outputs import TowerOutput

# The per-stage lists of the config (one entry per base stage); stored as tuples.
_STAGE_FIELDS = ("kernel_sizes", "in_channels", "out_channels", "strides", "num_block_repeats", "expand_ratios")
# PyTorch's BatchNorm2d default momentum, which transformers leaves on the expansion BatchNorm.
TORCH_DEFAULT_BN_MOMENTUM = 0.1


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """The fields of HF ``AlignVisionConfig`` (EfficientNet-B7 defaults); unknown keys go to ``extra``.

    ``num_hidden_layers``, which transformers derives (the number of blocks) and writes to
    ``config.json``, is not a field: it is the property of that name, recomputed by ``to_hf``.
    ``image_size`` is informational (the network accepts any resolution) and ``hidden_dim`` only sets
    the kernel of the reference's pooling layer, which always covers the whole final feature map, so
    neither changes the network here.

    ``bn_group_size`` is altjax's own option (not an HF key): in training mode every BatchNorm takes
    its statistics over groups of that many consecutive examples, as per-replica BatchNorm does in
    data-parallel training without cross-replica synchronisation (Kakao's coyo-align); ``None`` uses
    the whole batch, as PyTorch does. ``to_hf`` writes it only when it is set.
    """

    num_channels: int = 3
    image_size: int | tuple[int, int] = 600
    width_coefficient: float = 2.0
    depth_coefficient: float = 3.1
    depth_divisor: int = 8
    kernel_sizes: tuple[int, ...] = (3, 3, 5, 3, 5, 5, 3)
    in_channels: tuple[int, ...] = (32, 16, 24, 40, 80, 112, 192)
    out_channels: tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320)
    depthwise_padding: tuple[int, ...] = ()
    strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1)
    num_block_repeats: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
    expand_ratios: tuple[int, ...] = (1, 6, 6, 6, 6, 6, 6)
    squeeze_expansion_ratio: float = 0.25
    hidden_act: str = "swish"
    hidden_dim: int = 2560
    pooling_type: str = "mean"
    initializer_range: float = 0.02
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.99
    drop_connect_rate: float = 0.2
    bn_group_size: Optional[int] = None
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        # Lists given in Python become tuples, so that the config stays hashable and immutable.
        for name in (*_STAGE_FIELDS, "depthwise_padding"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        lengths = {name: len(getattr(self, name)) for name in _STAGE_FIELDS}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the per-stage lists must have one entry per stage; lengths: {lengths}")
        if self.bn_group_size is not None and self.bn_group_size < 1:
            raise ValueError(f"bn_group_size must be a positive number of examples or None, got {self.bn_group_size}")

    @property
    def num_hidden_layers(self) -> int:
        """The number of MBConv blocks, ``sum(ceil(depth_coefficient * r))`` (HF's derived key)."""
        return sum(round_repeats(self, r) for r in self.num_block_repeats)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "EfficientNetConfig":
        """From an HF ``AlignVisionConfig`` dict; ``num_hidden_layers`` is dropped (it is derived)."""
        return config_from_hf(cls, {k: v for k, v in d.items() if k != "num_hidden_layers"})

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict; ``from_hf(d).to_hf() == d`` for a dict written by transformers."""
        d = config_to_hf(self)
        if self.bn_group_size is None:
            del d["bn_group_size"]
        d["num_hidden_layers"] = self.num_hidden_layers
        return d


# EfficientNet-B0..B7 scaling (Tan & Le 2019), with the resolutions and head widths of HF's
# google/efficientnet-b* configs. ``depthwise_padding`` stays empty as in ALIGN's converted B7: the
# google/efficientnet-b* checkpoints list resolution-dependent blocks there; pass them as overrides.
EFFICIENTNET_PRESETS: dict[str, dict[str, Any]] = {
    "b0": dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280),
    "b1": dict(width_coefficient=1.0, depth_coefficient=1.1, image_size=240, hidden_dim=1280),
    "b2": dict(width_coefficient=1.1, depth_coefficient=1.2, image_size=260, hidden_dim=1408),
    "b3": dict(width_coefficient=1.2, depth_coefficient=1.4, image_size=300, hidden_dim=1536),
    "b4": dict(width_coefficient=1.4, depth_coefficient=1.8, image_size=380, hidden_dim=1792),
    "b5": dict(width_coefficient=1.6, depth_coefficient=2.2, image_size=456, hidden_dim=2048),
    "b6": dict(width_coefficient=1.8, depth_coefficient=2.6, image_size=528, hidden_dim=2304),
    "b7": dict(width_coefficient=2.0, depth_coefficient=3.1, image_size=600, hidden_dim=2560),
}


def efficientnet_config(name: str, **overrides: Any) -> EfficientNetConfig:
    """The config of EfficientNet ``"b0"`` .. ``"b7"``, with ``overrides`` applied.

    The align-base tower is ``efficientnet_config("b7", image_size=289, hidden_dim=640)``.
    """
    try:
        preset = EFFICIENTNET_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown EfficientNet preset {name!r}; known: {sorted(EFFICIENTNET_PRESETS)}") from None
    return EfficientNetConfig(**{**preset, **overrides})


# --- The block layout, shared by the model and the conversion table -------------------------------


def round_filters(config: EfficientNetConfig, channels: int) -> int:
    """Channels scaled by ``width_coefficient``, rounded to a multiple of ``depth_divisor``
    (never below the divisor, nor more than 10 % below the scaled value)."""
    divisor = config.depth_divisor
    scaled = channels * config.width_coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(config: EfficientNetConfig, repeats: int) -> int:
    """Block repeats scaled by ``depth_coefficient``, rounded up."""
    return int(math.ceil(config.depth_coefficient * repeats))


def correct_pad(kernel_size: int, adjust: bool = True) -> tuple[int, int, int, int]:
    """transformers' ``correct_pad``: the (left, right, top, bottom) zero padding of a stride-2
    depthwise conv; ``adjust`` moves one pixel of it from the left/top to the right/bottom."""
    c = kernel_size // 2
    return (c - 1, c, c - 1, c) if adjust else (c, c, c, c)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: channels, depthwise kernel and stride, and its place in the network."""

    index: int
    in_dim: int
    out_dim: int
    kernel_size: int
    stride: int
    expand_ratio: int
    # True for the first block of a stage: no residual connection, no dropout, even when shapes match.
    id_skip: bool
    adjust_padding: bool
    drop_rate: float

    @property
    def expand(self) -> bool:
        return self.expand_ratio != 1

    @property
    def expand_dim(self) -> int:
        return self.in_dim * self.expand_ratio


def block_specs(config: EfficientNetConfig) -> list[BlockSpec]:
    """Every block of the encoder in order, as ``AlignVisionEncoder`` builds them."""
    num_blocks = config.num_hidden_layers
    specs = []
    for stage in range(len(config.in_channels)):
        stage_in = round_filters(config, config.in_channels[stage])
        out_dim = round_filters(config, config.out_channels[stage])
        for j in range(round_repeats(config, config.num_block_repeats[stage])):
            i = len(specs)
            specs.append(
                BlockSpec(
                    index=i,
                    in_dim=stage_in if j == 0 else out_dim,
                    out_dim=out_dim,
                    kernel_size=config.kernel_sizes[stage],
                    stride=config.strides[stage] if j == 0 else 1,
                    expand_ratio=config.expand_ratios[stage],
                    id_skip=j == 0,
                    adjust_padding=i not in config.depthwise_padding,
                    drop_rate=config.drop_connect_rate * i / num_blocks,
                )
            )
    return specs


def stem_channels(config: EfficientNetConfig) -> int:
    # The reference hard-codes 32 stem channels (before width scaling), whatever in_channels[0] says.
    return round_filters(config, 32)


def _check_buildable(config: EfficientNetConfig, specs: Sequence[BlockSpec]) -> None:
    # transformers builds these configs and then fails in the first forward; fail early and clearly.
    if config.pooling_type not in ("mean", "max"):
        raise ValueError(f"pooling_type must be 'mean' or 'max', got {config.pooling_type!r}")
    bad = sorted(set(config.strides) - {1, 2})
    if bad:
        raise ValueError(f"strides must be 1 or 2 (the reference pads stride 1 'same', stride 2 explicitly), got {bad}")
    channels = stem_channels(config)
    for spec in specs:
        if spec.in_dim != channels:
            raise ValueError(
                f"block {spec.index} expects {spec.in_dim} input channels but receives {channels} "
                "(round_filters of in_channels must match the stem's 32 and the previous stage's out_channels)"
            )
        channels = spec.out_dim


# --- Layers ----------------------------------------------------------------------------------------


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


def _conv(
    din: int,
    dout: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    use_bias: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=tuple(padding),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        # EfficientNet's own init (He normal over fan-out), not transformers' N(0, 0.02): with 0.02 the
        # activations of a randomly initialised B7 vanish through 55 blocks and the embeddings are NaN.
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def _window(xp: jax.Array, a: int, b: int, stride: int, height: int, width: int) -> jax.Array:
    """``xp[:, a + stride * i, b + stride * j]`` for ``i < height``, ``j < width``: one tap's view."""
    n, _, _, c = xp.shape
    end = (n, a + stride * (height - 1) + 1, b + stride * (width - 1) + 1, c)
    return jax.lax.slice(xp, (0, a, b, 0), end, (1, stride, stride, 1))


def _shifted_sum(xp: jax.Array, kernel: jax.Array, stride: int, height: int, width: int, acc_dtype) -> jax.Array:
    """``sum_{a,b} window_{a,b}(xp) * kernel[a, b, 0]`` in ``acc_dtype``: XLA fuses the k*k terms into one loop."""
    out = None
    for a in range(kernel.shape[0]):
        for b in range(kernel.shape[1]):
            term = _window(xp, a, b, stride, height, width).astype(acc_dtype) * kernel[a, b, 0].astype(acc_dtype)
            out = term if out is None else out + term
    return out


def _output_size(size: int, pad: tuple[int, int], kernel_size: int, stride: int) -> int:
    return (size + pad[0] + pad[1] - kernel_size) // stride + 1


def _accumulation_dtype(dtype):
    # bf16/f16 products are summed in float32; float32 and float64 in their own precision.
    return jnp.promote_types(dtype, jnp.float32)


# The kernel gradient's fused loops (see _depthwise_kernel_grad) handle at most this many taps
# each, and fold about this many multiply-adds (taps x output rows) per element of their output.
_KERNEL_GRAD_TAPS = 9
_KERNEL_GRAD_TERMS = 72


def _depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape, stride: int, padding) -> jax.Array:
    """``dK[a, b, 0, c] = sum_{n,i,j} xp[n, a + s*i, b + s*j, c] * g[n, i, j, c]``, in float32 or wider.

    Written as one reduction per tap of ``window * g``, XLA:CPU materialises every shifted window
    (a copy of the activation per tap, 9 or 25 of them, each a fresh buffer) before reducing it,
    which made the kernel gradient 10x slower than the forward. Here the output rows are cut into
    blocks of ``rows`` and one variadic reduction sums, for several taps at once (a whole 3x3
    kernel, or one row of a larger one), the products over the rows of each block: XLA emits it as
    a single loop that reads ``x`` and ``g`` once for all those taps and writes partial sums
    ``rows`` times smaller than the activation. Only these partial sums are then reduced.
    (Fewer taps or rows per loop and XLA no longer vectorises it; a 25-tap loop spills.)
    """
    kh, kw = kernel_shape[:2]
    n, height, width, c = g.shape
    acc = _accumulation_dtype(x.dtype)
    taps_per_loop = kh * kw if kh * kw <= _KERNEL_GRAD_TAPS else kw
    blocks = -(-height // max(1, _KERNEL_GRAD_TERMS // taps_per_loop))
    rows = -(-height // blocks)  # rows per block, chosen so that blocks * rows - height < blocks
    # Zero cotangent rows complete the last block; the padded input reaches every row they read.
    g = jnp.pad(g.astype(acc), ((0, 0), (0, blocks * rows - height), (0, 0), (0, 0)))
    (top, bottom), (left, right) = padding
    need = stride * (blocks * rows - 1) + kh
    xp = jnp.pad(x, ((0, 0), (top, max(bottom, need - x.shape[1] - top)), (left, right), (0, 0)))
    products = [(_window(xp, a, b, stride, blocks * rows, width).astype(acc) * g).reshape(n, blocks, rows, width, c)
                for a in range(kh) for b in range(kw)]
    partial_sums = []
    for i in range(0, len(products), taps_per_loop):
        group = products[i:i + taps_per_loop]
        zeros = [jnp.zeros((), acc)] * len(group)
        partial_sums += jax.lax.reduce(group, zeros, lambda xs, ys: [u + v for u, v in zip(xs, ys)], (2,))
    return jnp.stack(partial_sums).sum(axis=(1, 2, 3)).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Depthwise convolution of NHWC ``x`` with ``kernel`` ``(kh, kw, 1, C)`` as shifted multiply-adds.

    ``padding`` is ``((top, bottom), (left, right))`` (non-negative). The kernel is rounded to
    ``x.dtype`` (the compute dtype) and the products are summed in float32 for bf16 inputs. The
    gradient is hand-written: JAX's autodiff of the k*k shifted terms keeps every tap's window as a
    residual and sums each tap's kernel gradient separately, which made the backward ~14x the
    forward on CPU. Residuals are only ``x`` and ``kernel``.
    """
    return _depthwise_forward(x, kernel, stride, padding)


def _depthwise_forward(x, kernel, stride, padding):
    (top, bottom), (left, right) = padding
    kh, kw = kernel.shape[:2]
    height = _output_size(x.shape[1], padding[0], kh, stride)
    width = _output_size(x.shape[2], padding[1], kw, stride)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = _shifted_sum(xp, kernel.astype(x.dtype), stride, height, width, _accumulation_dtype(x.dtype))
    return out.astype(x.dtype)


def _depthwise_fwd(x, kernel, stride, padding):
    return _depthwise_forward(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (top, _), (left, _) = padding
    _, height, width, _ = x.shape
    out_h, out_w = g.shape[1:3]
    # dx[p] = sum_a g[(p + top - a) / s] * K[a] over the taps a where that is a whole output row:
    # a stride-1 correlation of the flipped kernel with g dilated by s (s - 1 zero rows between
    # rows), padded so that at input row p the flipped tap K[kh - 1 - a'] reads dilated row
    # p + top - (kh - 1 - a'). A negative pad (padding wider than kh - 1, or input rows that no
    # window reached) crops instead.
    zero = jnp.zeros((), g.dtype)
    gd = jax.lax.pad(g, zero, ((0, 0, 0),
                               (kh - 1 - top, height + top - stride * (out_h - 1) - 1, stride - 1),
                               (kw - 1 - left, width + left - stride * (out_w - 1) - 1, stride - 1),
                               (0, 0, 0)))
    flipped = kernel.astype(x.dtype)[::-1, ::-1]
    dx = _shifted_sum(gd, flipped, 1, height, width, _accumulation_dtype(x.dtype)).astype(x.dtype)
    dkernel = _depthwise_kernel_grad(x, g, kernel.shape, stride, padding).astype(kernel.dtype)
    return dx, dkernel


depthwise_conv_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nnx.Module):
    """A k x k convolution with one filter per channel, kernel ``(k, k, 1, C)`` as ``nnx.Conv`` holds it.

    On CPU it is computed as k*k strided shifted multiply-adds (``depthwise_conv_shifted``, with a
    hand-written gradient), which XLA fuses into one loop: its CPU grouped convolution is 6-18x
    slower on EfficientNet's shapes, and made align-base's forward 3.3x slower than PyTorch's. On
    GPU and TPU the native grouped convolution is used. Both give the reference's result to float
    rounding (the sum runs in a different order). ``impl`` forces one form: ``"shifted"`` or
    ``"grouped"`` (default ``"auto"``: by backend).
    """

    def __init__(self, dim: int, kernel_size: int, *, stride: int, padding, dtype=jnp.float32, rngs: nnx.Rngs,
                 impl: str = "auto"):
        if impl not in ("auto", "shifted", "grouped"):
            raise ValueError(f"impl must be 'auto', 'shifted' or 'grouped', got {impl!r}")
        # EfficientNet's He-normal init; a depthwise kernel's TF fan-out is k*k (one output per
        # channel), which is JAX's fan-in for this shape (JAX's fan-out k*k*C would shrink the
        # activations by C at every block).
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, dim), jnp.float32))
        self.kernel_size, self.stride, self.dtype = kernel_size, stride, dtype
        self.padding = tuple(tuple(p) for p in padding)
        self.impl = impl

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        impl = self.impl if self.impl != "auto" else ("shifted" if jax.default_backend() == "cpu" else "grouped")
        if impl == "grouped":
            return jax.lax.conv_general_dilated(
                x, self.kernel[...].astype(self.dtype), (self.stride, self.stride), self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
        return depthwise_conv_shifted(x, self.kernel[...], self.stride, self.padding)


def _same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # PyTorch's padding="same" for stride 1: k - 1 in total, the odd pixel (even k) on the right.
    low = (kernel_size - 1) // 2
    return ((low, kernel_size - 1 - low),) * 2


def _norm(dim: int, config: EfficientNetConfig, momentum: float, dtype) -> BatchNorm:
    return BatchNorm(dim, eps=config.batch_norm_eps, momentum=momentum, group_size=config.bn_group_size, dtype=dtype)


class EfficientNetEmbeddings(nnx.Module):
    """The stem: zero padding (0, 1) right/bottom, 3x3 stride-2 conv without bias, BatchNorm, activation."""

    def __init__(self, config: EfficientNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        out_dim = stem_channels(config)
        # nn.ZeroPad2d((0, 1, 0, 1)) then a "valid" conv, for every input size (289 -> 144, not 145).
        self.convolution = _conv(
            config.num_channels, out_dim, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs
        )
        self.batchnorm = _norm(out_dim, config, config.batch_norm_momentum, dtype)
        self.activation = layers.activation(config.hidden_act)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.activation(self.batchnorm(self.convolution(pixel_values)))


class ExpansionLayer(nnx.Module):
    """1x1 conv to ``expand_ratio`` times the channels, BatchNorm, activation."""

    def __init__(self, config: EfficientNetConfig, spec: BlockSpec, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.expand_conv = _conv(spec.in_dim, spec.expand_dim, 1, dtype=dtype, rngs=rngs)
        # transformers does not pass batch_norm_momentum here, so this one keeps PyTorch's default 0.1.
        self.expand_bn = _norm(spec.expand_dim, config, TORCH_DEFAULT_BN_MOMENTUM, dtype)
        self.expand_act = layers.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.expand_act(self.expand_bn(self.expand_conv(x)))


class DepthwiseLayer(nnx.Module):
    """Depthwise conv (one filter per channel), BatchNorm, activation.

    Stride 2 pads ``correct_pad(k, adjust_padding)`` then convolves "valid"; stride 1 pads "same".
    """

    def __init__(self, config: EfficientNetConfig, spec: BlockSpec, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        k = spec.kernel_size
        if spec.stride == 2:
            left, right, top, bottom = correct_pad(k, spec.adjust_padding)
            padding = ((top, bottom), (left, right))
        else:
            padding = _same_padding(k)
        self.depthwise_conv = DepthwiseConv(dim, k, stride=spec.stride, padding=padding, dtype=dtype, rngs=rngs)
        self.depthwise_norm = _norm(dim, config, config.batch_norm_momentum, dtype)
        self.depthwise_act = layers.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.depthwise_act(self.depthwise_norm(self.depthwise_conv(x)))


class SqueezeExciteLayer(nnx.Module):
    """Channel gate: global mean, 1x1 conv down, activation, 1x1 conv up, sigmoid, multiply.

    The bottleneck width is ``squeeze_expansion_ratio`` times the block's *input* channels, not
    the expanded ones.
    """

    def __init__(self, config: EfficientNetConfig, spec: BlockSpec, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dim_se = max(1, int(spec.in_dim * config.squeeze_expansion_ratio))
        self.reduce = _conv(dim, dim_se, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.expand = _conv(dim_se, dim, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.act_reduce = layers.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = jax.nn.sigmoid(self.expand(self.act_reduce(self.reduce(squeezed))))
        return x * gate


class FinalBlockLayer(nnx.Module):
    """1x1 projection conv and BatchNorm (no activation); on repeats, dropout and the residual.

    The dropout is element-wise (``nn.Dropout`` in the reference), not per-example stochastic depth.
    """

    def __init__(self, config: EfficientNetConfig, spec: BlockSpec, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.apply_dropout = spec.stride == 1 and not spec.id_skip
        self.project_conv = _conv(dim, spec.out_dim, 1, dtype=dtype, rngs=rngs)
        self.project_bn = _norm(spec.out_dim, config, config.batch_norm_momentum, dtype)
        self.dropout = nnx.Dropout(spec.drop_rate, deterministic=True, rngs=rngs)

    def __call__(self, block_input: jax.Array, x: jax.Array) -> jax.Array:
        x = self.project_bn(self.project_conv(x))
        if self.apply_dropout:
            x = self.dropout(x) + block_input
        return x


class MBConvBlock(nnx.Module):
    """One mobile inverted bottleneck block (transformers' ``AlignVisionBlock``)."""

    def __init__(self, config: EfficientNetConfig, spec: BlockSpec, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dim = spec.expand_dim if spec.expand else spec.in_dim
        self.expansion = ExpansionLayer(config, spec, dtype=dtype, rngs=rngs) if spec.expand else None
        self.depthwise_conv = DepthwiseLayer(config, spec, dim, dtype=dtype, rngs=rngs)
        self.squeeze_excite = SqueezeExciteLayer(config, spec, dim, dtype=dtype, rngs=rngs)
        self.projection = FinalBlockLayer(config, spec, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.expansion(x) if self.expansion is not None else x
        h = self.squeeze_excite(self.depthwise_conv(h))
        return self.projection(x, h)


class EfficientNetEncoder(nnx.Module):
    def __init__(self, config: EfficientNetConfig, specs: Sequence[BlockSpec], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.blocks = nnx.List([MBConvBlock(config, spec, dtype=dtype, rngs=rngs) for spec in specs])


class EfficientNet(nnx.Module):
    """ALIGN's EfficientNet image tower (transformers' ``AlignVisionModel``).

    ``dtype`` is the compute dtype; parameters and BatchNorm statistics are float32, and BatchNorm
    always computes in float32. Built in eval mode (running statistics, no dropout); ``train()``
    switches every BatchNorm to batch statistics and turns on the residual dropout.
    """

    def __init__(self, config: EfficientNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        specs = block_specs(config)
        _check_buildable(config, specs)
        self.config = config
        self.dtype = dtype
        self.embeddings = EfficientNetEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = EfficientNetEncoder(config, specs, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> TowerOutput:
        """Encodes NHWC images (B, H, W, num_channels) of any size.

        Returns ``last_hidden_state``, the last block's output (B, h, w, C) NHWC, ``pooler_output``
        (B, C) in float32, its global spatial mean (max for ``pooling_type="max"``; the reference's
        pooling window always covers the whole map), and with ``output_hidden_states`` the stem
        output followed by every block's output, as transformers returns them. Arguments are
        checked by ``altjax.models.inputs.check_pixels`` (rank, channels, floating dtype); a
        mistake raises ``ValueError``.
        """
        inputs.check_pixels(type(self).__name__, pixel_values, self.config.num_channels, nchw=False)
        return self.forward(pixel_values, output_hidden_states)

    def forward(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> TowerOutput:
        """``__call__`` without the argument checks, for models that checked them at their own boundary."""
        x = self.embeddings(jnp.asarray(pixel_values, self.dtype))
        hidden_states = [x]
        for block in self.encoder.blocks:
            x = block(x)
            hidden_states.append(x)
        features = x.astype(jnp.float32)
        if self.config.pooling_type == "max":
            pooled = jnp.max(features, axis=(1, 2))
        else:
            pooled = jnp.mean(features, axis=(1, 2))
        return TowerOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
