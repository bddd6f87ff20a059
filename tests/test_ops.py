"""altjax.models.ops: the kernels with hand-written gradients, against autodiff of plain JAX.

The shifted depthwise convolution against XLA's grouped convolution, and training-mode BatchNorm
against the plain formula, for the paddings EfficientNet builds (stride-1 "same", transformers'
fixed stride-2 pads) and a few others: outputs and gradients within 1e-5 relative to the largest
reference value in float32, 2e-2 with bf16 inputs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altjax.models.efficientnet import _same_padding, correct_pad
from altjax.models.ops.batch_norm import BatchNorm, batch_norm_train
from altjax.models.ops.depthwise_conv import DepthwiseConv, depthwise_conv_shifted
from helpers import assert_rel_close


def stride2_padding(k, adjust):
    left, right, top, bottom = correct_pad(k, adjust)
    return ((top, bottom), (left, right))


# (kernel, stride, padding) as the model builds them: "same" for stride 1, transformers' fixed
# (adjusted or not) pads for stride 2; even kernels; a pad wider than k - 1; no padding at all.
DEPTHWISE_CASES = [
    (3, 1, _same_padding(3)), (5, 1, _same_padding(5)),
    (3, 2, stride2_padding(3, True)), (3, 2, stride2_padding(3, False)),
    (5, 2, stride2_padding(5, True)), (5, 2, stride2_padding(5, False)),
    (4, 1, _same_padding(4)), (2, 2, ((0, 1), (0, 1))), (4, 2, stride2_padding(4, True)),
    (3, 1, ((3, 0), (0, 2))), (3, 2, ((0, 0), (0, 0))),
]


def grouped_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1], precision="highest")


def value_and_vjp(f, *args, seed):
    """``f(*args)`` and its VJP with a random cotangent (in the output's dtype) for each argument."""
    y, vjp = jax.vjp(f, *args)
    ct = jax.random.normal(jax.random.key(seed), y.shape, jnp.float32).astype(y.dtype)
    return (y, *vjp(ct))


# 21 x 23: 10-21 output rows, cut into several blocks by the kernel gradient's row folding (the
# last one partly zero-padded for most kernels), odd and even sizes; 8 x 9: a single block.
@pytest.mark.parametrize("size", [(8, 9), (21, 23)], ids=["8x9", "21x23"])
@pytest.mark.parametrize("k,stride,padding", DEPTHWISE_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_shifted_depthwise_gradients_match_grouped_conv_autodiff(k, stride, padding, size):
    x = jax.random.normal(jax.random.key(0), (3, *size, 6))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, 6))
    ours = jax.jit(lambda x, w: value_and_vjp(lambda x, w: depthwise_conv_shifted(x, w, stride, padding), x, w, seed=2))
    ref = jax.jit(lambda x, w: value_and_vjp(lambda x, w: grouped_conv(x, w, stride, padding), x, w, seed=2))
    what = f"k={k} stride={stride} padding={padding} input {size}"
    diffs = [assert_rel_close(a, b, rtol=1e-5, what=f"{what}: {name}")
             for name, a, b in zip(("output", "input gradient", "kernel gradient"), ours(x, kernel), ref(x, kernel))]
    print(f"{what}: max relative diff output {diffs[0]:.1e}, dx {diffs[1]:.1e}, dkernel {diffs[2]:.1e}")


@pytest.mark.parametrize("k,stride,padding", [(3, 1, _same_padding(3)), (5, 2, stride2_padding(5, True))])
def test_shifted_depthwise_bf16_gradients(k, stride, padding):
    # bf16 activations, float32 kernel (the parameter): products summed in float32, the input
    # gradient in bf16, the kernel gradient in float32, all close to the float32 reference.
    x = jax.random.normal(jax.random.key(3), (4, 19, 19, 8))
    kernel = jax.random.normal(jax.random.key(4), (k, k, 1, 8))
    fn = lambda x, w: depthwise_conv_shifted(x, w, stride, padding)  # noqa: E731
    y, dx, dkernel = jax.jit(lambda x, w: value_and_vjp(fn, x, w, seed=5))(x.astype(jnp.bfloat16), kernel)
    dtypes = (y.dtype, dx.dtype, dkernel.dtype)
    assert dtypes == (jnp.bfloat16, jnp.bfloat16, jnp.float32), f"output, dx, dkernel dtypes {dtypes}"
    ref = jax.jit(lambda x, w: value_and_vjp(lambda x, w: grouped_conv(x, w, stride, padding), x, w, seed=5))
    # The reference sees the same bf16-rounded input, kernel and cotangent, in float32.
    rounded = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    y_ref, dx_ref, dk_ref = ref(rounded(x), rounded(kernel))
    for name, a, b in (("output", y, y_ref), ("input gradient", dx, dx_ref), ("kernel gradient", dkernel, dk_ref)):
        diff = assert_rel_close(np.asarray(a, np.float32), b, rtol=2e-2, what=f"bf16 k={k} stride={stride} {name}")
        print(f"bf16 k={k} stride={stride} {name}: max relative diff {diff:.1e}")


def test_depthwise_conv_module_shifted_and_grouped_agree_in_training():
    # Through the module as the model calls it: the shifted form's gradient reaches the kernel Param.
    def grads(impl):
        m = DepthwiseConv(5, 3, stride=2, padding=stride2_padding(3, True), rngs=nnx.Rngs(0), impl=impl)
        x = jax.random.normal(jax.random.key(6), (2, 11, 11, 5))
        w = jax.random.normal(jax.random.key(7), (2, 5, 5, 5))
        return nnx.grad(lambda m, x: jnp.sum(m(x) * w), argnums=(0, 1))(m, x)

    (m_shifted, x_shifted), (m_grouped, x_grouped) = grads("shifted"), grads("grouped")
    dk = assert_rel_close(m_shifted.kernel[...], m_grouped.kernel[...], rtol=1e-5, what="module kernel gradient")
    dx = assert_rel_close(x_shifted, x_grouped, rtol=1e-5, what="module input gradient")
    print(f"DepthwiseConv shifted vs grouped: kernel gradient {dk:.1e}, input gradient {dx:.1e}")


def plain_batch_norm(x, scale, bias, eps, group):
    """The training-mode BatchNorm formula, differentiated by JAX (the reference for the custom VJP)."""
    xg = x.astype(jnp.float32).reshape((x.shape[0] // group, group) + x.shape[1:])
    mean = jnp.mean(xg, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps) * scale + bias).reshape(x.shape)


@pytest.mark.parametrize("group,offset", [(6, 0.0), (2, 0.0), (3, 50.0)], ids=["batch", "groups-of-2", "offset-50"])
def test_batch_norm_train_gradient_matches_autodiff(group, offset):
    # offset: a mean far from zero relative to the spread, where a one-pass variance would lose digits.
    x = jax.random.normal(jax.random.key(8), (6, 5, 7, 4)) * jnp.array([0.5, 1.0, 2.0, 0.1]) + offset
    scale = jax.random.normal(jax.random.key(9), (4,)) + 1.0
    bias = jax.random.normal(jax.random.key(10), (4,))
    results = {}
    for name, fn in (("custom", batch_norm_train), ("autodiff", plain_batch_norm)):
        f = lambda x, s, b: fn(x, s, b, 1e-3, group)  # noqa: E731
        results[name] = jax.jit(lambda x, s, b: value_and_vjp(f, x, s, b, seed=11))(x, scale, bias)
    names = ("output", "input gradient", "scale gradient", "bias gradient")
    diffs = [assert_rel_close(a, b, rtol=1e-5, what=f"BatchNorm group {group} offset {offset}: {n}")
             for n, a, b in zip(names, results["custom"], results["autodiff"])]
    print(f"BatchNorm group {group} offset {offset}: " + ", ".join(f"{n} {d:.1e}" for n, d in zip(names, diffs)))


def test_batch_norm_group_size_one_example_per_group_is_an_error():
    bn = BatchNorm(4, group_size=1, use_running_average=False)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(jnp.ones((2, 1, 1, 4)))
