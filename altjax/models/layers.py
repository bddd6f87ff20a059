"""Pieces shared by the towers: activations, multi-head attention, L2 normalisation.

Parameters are always created in float32; ``dtype`` is the compute dtype (bf16 for mixed precision).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx


def gelu(x: jax.Array) -> jax.Array:
    # transformers' "gelu" is the exact erf form; flax's default is the tanh approximation (4e-4 off).
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    # CLIP's activation: x * sigmoid(1.702 x).
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def l2_normalize(x: jax.Array) -> jax.Array:
    # No epsilon, as both references (x / x.norm()); a zero vector gives NaN there too.
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def to_nhwc(pixel_values: jax.Array, channels: int) -> jax.Array:
    """Images as NHWC. altjax processors give NHWC; HF-style NCHW input (channels in dim 1 and not
    last) is transposed, so that transformers' processor outputs work unchanged."""
    x = jnp.asarray(pixel_values)
    if x.ndim == 4 and x.shape[-1] != channels and x.shape[1] == channels:
        x = jnp.transpose(x, (0, 2, 3, 1))
    return x


def linear(din: int, dout: int, *, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear layer with fp32 parameters, N(0, 0.02) weights and zero bias (transformers' init)."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def layer_norm(dim: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # eps must always be given: 1e-12 for BERT, 1e-5 for XLM-R and CLIP; flax's default is 1e-6.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def embedding(num: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        num, dim, dtype=dtype, param_dtype=jnp.float32, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_heads: int,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    dropout: Optional[nnx.Dropout] = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention on (B, L, H*Dh) projections; returns (B, Lq, H*Dh).

    ``mask`` is boolean, True where a query may attend a key, broadcastable to (B, H, Lq, Lk).
    Without active attention dropout this is ``jax.nn.dot_product_attention``, which takes the fused
    cuDNN flash path on GPU; with dropout (training) it computes the probabilities explicitly, as
    the reference does. Logits and softmax are computed in float32 in both paths.
    """
    b, lq, width = q.shape
    head_dim = width // num_heads
    q = q.reshape(b, lq, num_heads, head_dim)
    k = k.reshape(b, k.shape[1], num_heads, head_dim)
    v = v.reshape(b, v.shape[1], num_heads, head_dim)
    use_dropout = dropout is not None and not dropout.deterministic and dropout.rate > 0
    if not use_dropout:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
        return out.reshape(b, lq, width)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    if is_causal:
        causal = jnp.tril(jnp.ones((lq, k.shape[1]), dtype=bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, width)
