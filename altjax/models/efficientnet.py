"""EfficientNet, the image tower of ALIGN (transformers' ``AlignVisionModel``).

A stem (fixed (0, 1) zero padding, 3x3 stride-2 conv, BatchNorm, swish) followed by MBConv blocks
(optional 1x1 expansion, depthwise conv, squeeze-excite, 1x1 projection, residual on repeats) and a
global pooling. Unlike transformers' ``EfficientNetModel`` there is no top conv: the pooled last
block is the image feature. Module attribute names mirror the PyTorch module names
(``embeddings.convolution``, ``encoder.blocks[i].depthwise_conv.depthwise_norm``, ...) so that the
table of transformers' state dict at the end of this file reads as a plain rename. With
``scan_layers`` the repeats of each stage are stacked and scanned (``encoder.groups``,
:func:`block_groups`); the table stacks and unstacks their rows. The BatchNorm
and the depthwise convolution, with their hand-written gradients, are in ``altjax.models.ops``.

Images are NHWC. Every padding is explicit and equals the reference's: PyTorch's stride-2 layers
pad a fixed (0, 1) / (1, 2), which no "SAME" rule reproduces for every input size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.model_io.engine import Row, Table, batch_norm_rows, conv_rows
from altjax.models import inputs, layers, stack
from altjax.models.configuration import altjax_field, config_from_hf, config_to_hf
from altjax.models.ops.batch_norm import TORCH_DEFAULT_BN_MOMENTUM, BatchNorm
from altjax.models.ops.depthwise_conv import DepthwiseConv
from altjax.models.outputs import TowerOutput

# The per-stage lists of the config (one entry per base stage); stored as tuples.
_STAGE_FIELDS = ("kernel_sizes", "in_channels", "out_channels", "strides", "num_block_repeats", "expand_ratios")


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
    # altjax's own (not written to HF configs): each run of identical blocks within a stage stacked
    # and run by one scan (EfficientNetEncoder).
    scan_layers: bool = altjax_field(False)
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
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> "EfficientNetConfig":
        """From an HF ``AlignVisionConfig`` dict; ``num_hidden_layers`` is dropped (it is derived)."""
        return config_from_hf(cls, {k: v for k, v in d.items() if k != "num_hidden_layers"}, **overrides)

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


# --- The block layout, shared by the model and its table ------------------------------------------


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


# --- Layers ---------------------------------------------------------------------------------------


def _pointwise(inputs, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, preferred_element_type=None,
               out_sharding=None) -> jax.Array:
    """A 1x1, stride-1, unpadded NHWC convolution as the matmul over channels it is (nnx.Conv's
    ``conv_general_dilated`` hook, so the parameters stay nnx.Conv's).

    XLA:CPU rewrites such convolutions (and their kernel gradients) into fast dots only outside
    while loops; inside a scanned stage they stayed generic convolutions of about 90 ms each, and
    the scanned align-base step took 12.0 s against 4.05 s unrolled (one CPU device, batch 2).
    """
    del window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, out_sharding
    return jax.lax.dot_general(inputs, kernel[0, 0], (((inputs.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


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
        conv_general_dilated=(_pointwise if kernel_size == 1 and stride == 1 and not any(sum(padding, ()))
                              else jax.lax.conv_general_dilated),
        rngs=rngs,
    )


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

    def __call__(self, block_input: jax.Array, x: jax.Array, drop_rate: Optional[jax.Array] = None) -> jax.Array:
        x = self.project_bn(self.project_conv(x))
        if self.apply_dropout:
            x = (self.dropout(x) if drop_rate is None else self._dropout_at(x, drop_rate)) + block_input
        return x

    def _dropout_at(self, x: jax.Array, rate: jax.Array) -> jax.Array:
        # The dropout of a scanned block, whose rate is the scan's per-layer input rather than the
        # static rate nnx.Dropout needs: the same mask distribution, from the same rng stream.
        if self.dropout.deterministic:
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.dropout.rngs(), keep, x.shape)
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class MBConvBlock(nnx.Module):
    """One mobile inverted bottleneck block (transformers' ``AlignVisionBlock``)."""

    def __init__(self, config: EfficientNetConfig, spec: BlockSpec, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dim = spec.expand_dim if spec.expand else spec.in_dim
        self.expansion = ExpansionLayer(config, spec, dtype=dtype, rngs=rngs) if spec.expand else None
        self.depthwise_conv = DepthwiseLayer(config, spec, dim, dtype=dtype, rngs=rngs)
        self.squeeze_excite = SqueezeExciteLayer(config, spec, dim, dtype=dtype, rngs=rngs)
        self.projection = FinalBlockLayer(config, spec, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, drop_rate: Optional[jax.Array] = None) -> jax.Array:
        h = self.expansion(x) if self.expansion is not None else x
        h = self.squeeze_excite(self.depthwise_conv(h))
        return self.projection(x, h, drop_rate)


def block_groups(specs: Sequence[BlockSpec]) -> list[tuple[BlockSpec, ...]]:
    """``specs`` cut into runs of identical blocks, the layers a scanned encoder stacks: a stage's
    first block (other channels or stride) stands alone, and its repeats form one run unless a
    depthwise padding listed for some of them splits it. Blocks of a run differ only in their
    drop-connect rate, which the scan takes as a per-layer input."""
    groups: list[list[BlockSpec]] = []
    for spec in specs:
        same = dataclasses.replace(spec, index=0, drop_rate=0.0)
        if groups and not spec.id_skip and dataclasses.replace(groups[-1][0], index=0, drop_rate=0.0) == same:
            groups[-1].append(spec)
        else:
            groups.append([spec])
    return [tuple(g) for g in groups]


class BlockStack(nnx.Module):
    """A run of identical MBConv blocks (:func:`block_groups`) stacked for a scan under the
    attribute ``layers`` (which ``altjax.sharding.layer_axis`` recognises as stacked)."""

    def __init__(self, config: EfficientNetConfig, specs: Sequence[BlockSpec], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.drop_rates = tuple(spec.drop_rate for spec in specs)
        self.layers = stack.build(lambda r: MBConvBlock(config, specs[0], dtype=dtype, rngs=r), len(specs), scan=True,
                                  rngs=rngs)


class EfficientNetEncoder(nnx.Module):
    """The MBConv blocks, each rematerialised on its own under ``remat_policy``
    (:mod:`altjax.models.stack`).

    Unrolled (``blocks[i]``, as transformers), or with ``scan_layers`` as ``groups``: each run of
    identical blocks within a stage (:func:`block_groups`) stacked in a :class:`BlockStack` and run
    by one scan, the others as single blocks. The drop-connect rate, which grows from block to
    block, is the scan's per-layer input."""

    def __init__(self, config: EfficientNetConfig, specs: Sequence[BlockSpec], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.remat_policy: Optional[str] = None
        self.scan_layers = config.scan_layers
        if not config.scan_layers:
            self.blocks = nnx.List([MBConvBlock(config, spec, dtype=dtype, rngs=rngs) for spec in specs])
            return
        self.groups = nnx.List([
            BlockStack(config, group, dtype=dtype, rngs=rngs) if len(group) > 1
            else MBConvBlock(config, group[0], dtype=dtype, rngs=rngs)
            for group in block_groups(specs)])

    def __call__(self, x: jax.Array, output_hidden_states: bool = False):
        if not self.scan_layers:
            return stack.run(self.blocks, x, lambda block, h: block(h), scan=False, remat_policy=self.remat_policy,
                             output_hidden_states=output_hidden_states)
        hidden_states = [x]
        for group in self.groups:
            if isinstance(group, BlockStack):
                x, states = stack.run(group.layers, x, lambda block, h, rate: block(h, rate), scan=True,
                                      remat_policy=self.remat_policy, output_hidden_states=output_hidden_states,
                                      per_layer=jnp.asarray(group.drop_rates, jnp.float32))
            else:
                x, states = stack.run([group], x, lambda block, h: block(h), scan=False,
                                      remat_policy=self.remat_policy, output_hidden_states=output_hidden_states)
            if output_hidden_states:
                hidden_states.extend(states[1:])
        return x, tuple(hidden_states) if output_hidden_states else None


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
        x, hidden_states = self.encoder(self.embeddings(jnp.asarray(pixel_values, self.dtype)), output_hidden_states)
        features = x.astype(jnp.float32)
        if self.config.pooling_type == "max":
            pooled = jnp.max(features, axis=(1, 2))
        else:
            pooled = jnp.mean(features, axis=(1, 2))
        return TowerOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=hidden_states,
        )



# --- transformers' state dict (``AlignVisionModel``) ----------------------------------------------
# Keys relative to the tower; ALIGN's table places them under ``vision_model.``. Conv kernels
# (depthwise ones too) change layout OIHW <-> HWIO; BatchNorm statistics are copied, and
# ``num_batches_tracked`` (unused: every BatchNorm has a momentum) starts at 0 when a checkpoint
# lacks it.

STEM = [*conv_rows("embeddings.convolution"), *batch_norm_rows("embeddings.batchnorm")]

# Only blocks whose expand_ratio is not 1 have these; "{i}" is the global block index.
EXPANSION = [
    *conv_rows("encoder.blocks.{i}.expansion.expand_conv"),
    *batch_norm_rows("encoder.blocks.{i}.expansion.expand_bn"),
]

# Every block, in the reference's registration order.
BLOCK = [
    *conv_rows("encoder.blocks.{i}.depthwise_conv.depthwise_conv"),
    *batch_norm_rows("encoder.blocks.{i}.depthwise_conv.depthwise_norm"),
    *conv_rows("encoder.blocks.{i}.squeeze_excite.reduce", bias=True),
    *conv_rows("encoder.blocks.{i}.squeeze_excite.expand", bias=True),
    *conv_rows("encoder.blocks.{i}.projection.project_conv"),
    *batch_norm_rows("encoder.blocks.{i}.projection.project_bn"),
]


def efficientnet_rows(config: EfficientNetConfig) -> list[Row]:
    """Every tensor of the vision tower, keys relative to it (``embeddings.convolution.weight``, ...).
    With ``scan_layers`` the blocks are the encoder's ``groups``: block ``i`` of transformers is a
    single group, or index ``j`` of a stacked group's ``layers`` (:func:`block_groups`)."""
    rows = list(STEM)
    if not config.scan_layers:
        for spec in block_specs(config):
            template = EXPANSION + BLOCK if spec.expand else BLOCK
            rows += [Row(r.torch.format(i=spec.index), r.nnx.format(i=spec.index), r.layout) for r in template]
        return rows
    for g, group in enumerate(block_groups(block_specs(config))):
        template = EXPANSION + BLOCK if group[0].expand else BLOCK
        stacked = len(group) > 1
        place = f"encoder.groups.{g}.layers." if stacked else f"encoder.groups.{g}."
        for j, spec in enumerate(group):
            rows += [Row(r.torch.format(i=spec.index), r.nnx.replace("encoder.blocks.{i}.", place), r.layout,
                         **({"index": j} if stacked else {})) for r in template]
    return rows


def efficientnet_table(config: EfficientNetConfig) -> Table:
    """The table of a standalone vision tower (an ``AlignVisionModel`` state dict)."""
    return Table(rows=tuple(efficientnet_rows(config)))
