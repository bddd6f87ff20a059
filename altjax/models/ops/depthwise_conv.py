"""Depthwise convolution as shifted multiply-adds, with a hand-written gradient.

XLA:CPU's grouped convolution is 6-18x slower than k*k fused shifted multiply-adds on
EfficientNet's shapes, and autodiff of those multiply-adds is slow in its own way (see
``depthwise_conv_shifted`` and ``_depthwise_kernel_grad``). ``DepthwiseConv`` picks the shifted
form on CPU and the native grouped convolution elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


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

