"""The pre-LN transformer encoder shared by CLIP's two towers (``altjax.models.vit``, the image
tower, and ``altjax.models.clip_text``, the text tower, which runs it under a causal mask).

Layers: ``x + attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``, with transformers' CLIP
initialisation. It reads only fields that CLIP's vision and text configs both have
(``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_hidden_layers``,
``hidden_act``, ``layer_norm_eps``, ``attention_dropout``, ``initializer_factor``).
Attribute names mirror the PyTorch modules (``layers[i].self_attn.q_proj``, ...), and
``encoder_rows`` lists their tensors in transformers' state dict. With the config's ``scan_layers``
the layers are one module whose variables have a leading layer axis (``layers.self_attn.q_proj``,
kernel (L, D, D)), applied by ``nnx.scan``: XLA compiles one layer whatever the depth. The table's
rows then stack and unstack transformers' per-layer tensors.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.model_io.engine import Row, layer_norm_rows, linear_rows, repeated
from altjax.models import layers, stack


def _linear(din: int, dout: int, std: float, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with q/k/v/out projections; probabilities dropped in training only."""

    def __init__(self, config: Any, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.initializer_factor
        self.num_heads = config.num_attention_heads
        # transformers' CLIP init: depth-scaled in-projections.
        in_std = d**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * f
        self.k_proj = _linear(d, d, in_std, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(d, d, in_std, dtype=dtype, rngs=rngs)
        self.q_proj = _linear(d, d, in_std, dtype=dtype, rngs=rngs)
        self.out_proj = _linear(d, d, d**-0.5 * f, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.attention_dropout, deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, is_causal: bool = False) -> jax.Array:
        out = layers.dot_product_attention(
            self.q_proj(x),
            self.k_proj(x),
            self.v_proj(x),
            num_heads=self.num_heads,
            mask=mask,
            is_causal=is_causal,
            dropout=self.dropout,
        )
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with the config's activation (``quick_gelu`` for CLIP)."""

    def __init__(self, config: Any, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.initializer_factor
        self.act = layers.activation(config.hidden_act)
        self.fc1 = _linear(d, config.intermediate_size, (2 * d) ** -0.5 * f, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(
            config.intermediate_size, d, d**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * f, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """A pre-LN layer: ``x + attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    def __init__(self, config: Any, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = layers.layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layers.layer_norm(d, eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, is_causal: bool = False) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """``num_hidden_layers`` encoder layers: ``layers[i]``, or with ``config.scan_layers`` one
    stacked ``layers`` (every variable, dropout keys included, with a leading layer axis); see
    :mod:`altjax.models.stack`, which also rematerialises them one by one under ``remat_policy``."""

    def __init__(self, config: Any, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scan_layers = config.scan_layers
        self.remat_policy: Optional[str] = None
        self.layers = stack.build(lambda r: CLIPEncoderLayer(config, dtype=dtype, rngs=r), config.num_hidden_layers,
                                  scan=config.scan_layers, rngs=rngs)

    def __call__(
        self, x: jax.Array, mask: Optional[jax.Array] = None, is_causal: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[jax.Array, Optional[tuple[jax.Array, ...]]]:
        """Returns the last layer's output and, with ``output_hidden_states``, every hidden state
        (the input and each layer's output; ``None`` otherwise)."""
        return stack.run(self.layers, x, lambda layer, h: layer(h, mask, is_causal), scan=self.scan_layers,
                         remat_policy=self.remat_policy, output_hidden_states=output_hidden_states)


# --- transformers' state dict ---------------------------------------------------------------------

# One encoder layer of either tower; "{i}" is the layer index.
LAYER = [
    *linear_rows("encoder.layers.{i}.self_attn.k_proj"),
    *linear_rows("encoder.layers.{i}.self_attn.v_proj"),
    *linear_rows("encoder.layers.{i}.self_attn.q_proj"),
    *linear_rows("encoder.layers.{i}.self_attn.out_proj"),
    *layer_norm_rows("encoder.layers.{i}.layer_norm1"),
    *linear_rows("encoder.layers.{i}.mlp.fc1"),
    *linear_rows("encoder.layers.{i}.mlp.fc2"),
    *layer_norm_rows("encoder.layers.{i}.layer_norm2"),
]


def encoder_rows(num_layers: int, scan_layers: bool = False) -> list[Row]:
    """Every tensor of ``encoder`` (keys ``encoder.layers.{i}.*``, relative to the tower), in the
    in-memory spelling; AltCLIP's on-disk ``encoder.layer.{i}`` is an alias of AltCLIP's table.
    With ``scan_layers`` layer i's tensors fill index i of the stacked ``encoder.layers.*``."""
    return repeated(LAYER, num_layers, stacked=scan_layers)
