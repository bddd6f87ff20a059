"""The CLIP vision transformer, AltCLIP's image tower (transformers' ``CLIPVisionModel`` / ``AltCLIPVisionModel``).

Patch embedding (a bias-free conv with stride = kernel = patch size), a class token, learned
position embeddings, ``pre_layrnorm`` (the reference's spelling), pre-LN encoder layers with
``quick_gelu``, and ``post_layernorm`` applied to the class token only: that normed token is
``pooler_output``, while ``last_hidden_state`` is left un-normed, as in the reference.

The encoder is ``altjax.models.clip_transformer.CLIPEncoder``, shared with CLIP's text tower.

Images are NHWC. Attribute names mirror the PyTorch modules (``embeddings.patch_embedding``,
``encoder.layers[i].self_attn.q_proj``, ...) so that the table of transformers' state dict at the
end of this file reads as a plain rename.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altjax.model_io.engine import Row, Table, conv_rows, embedding_rows, layer_norm_rows
from altjax.models import inputs, layers
from altjax.models.clip_transformer import CLIPEncoder, encoder_rows
from altjax.models.configuration import altjax_field, config_from_hf, config_to_hf
from altjax.models.outputs import TowerOutput

MODEL_TYPE = "clip_vision_model"
# PyTorch's bicubic kernel constant (``upsample_bicubic2d``); jax.image.resize's cubic uses -0.5.
TORCH_CUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of HF ``CLIPVisionConfig`` / ``AltCLIPVisionConfig`` (ViT-B/32 at 224 px defaults).

    Unknown keys (``model_type``, ...) are kept in ``extra``. ``projection_dim`` is not used by the
    tower (the dual encoders own their projections); ``initializer_factor`` scales the random init.
    ``scan_layers`` is altjax's own (not written to HF configs): stacked encoder layers run by a scan.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    # Stacked layers run by one scan (compiled once, whatever the depth) instead of a loop.
    scan_layers: bool = altjax_field(False)
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        # HF's config type allows lists, but the reference's embeddings only work with square ints.
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int (square images and patches), got {getattr(self, name)!r}")

    @property
    def num_positions(self) -> int:
        """Position-table rows: one per patch of an ``image_size`` image, plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "CLIPVisionConfig":
        """From an HF ``CLIPVisionConfig`` / ``AltCLIPVisionConfig`` dict; other keys go to ``extra``."""
        return config_from_hf(cls, d)

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict: fields, kept extra keys, and ``model_type`` if it was not kept."""
        d = config_to_hf(self)
        d.setdefault("model_type", MODEL_TYPE)
        return d


# --- PyTorch's bicubic interpolation --------------------------------------------------------------


def _fma(a, b, c) -> np.ndarray:
    # A float32 fused multiply-add: the float64 product of two float32 values is exact, so one
    # rounding to float32 remains. PyTorch's kernels are compiled with multiply-add contraction
    # (x86 FMA, CUDA fmad): computed this way the weights agree with its to about one ulp, eight
    # ulps otherwise.
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _cubic_coefficients(t: np.ndarray) -> np.ndarray:
    # ATen's get_cubic_upsample_coefficients(t): Keys' kernel at distances t+1, t, 1-t, 2-t.
    a, one = np.float32(TORCH_CUBIC_A), np.float32(1.0)

    def near(x):  # |x| <= 1: ((a + 2) x - (a + 3)) x x + 1
        return _fma(_fma(a + 2, x, -(a + 3)) * x, x, one)

    def far(x):  # 1 < |x| < 2: ((a x - 5a) x + 8a) x - 4a
        return _fma(_fma(_fma(a, x, -5 * a), x, 8 * a), x, -4 * a)

    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 matrix of PyTorch's 1-D bicubic resize.

    ``F.interpolate(mode="bicubic", align_corners=False, size=...)``: source coordinate
    ``(i + 0.5) * in/out - 0.5`` (not clamped), Keys kernel with a = -0.75, four taps whose indices
    are clamped to the border (so border taps add up), no antialiasing when downscaling. Computed
    in float32 as ATen does (weights agree with PyTorch's to about one float32 ulp).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = _fma(scale, np.arange(out_size, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - base.astype(np.float32), np.float32(0), np.float32(1))
    weights = _cubic_coefficients(t)
    taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def torch_bicubic_resize(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes a (H, W, C) grid to ``size`` = (h, w) as PyTorch's bicubic ``F.interpolate`` does.

    Computed in float32 at full matmul precision (the reference runs it on the fp32 parameters);
    It matches PyTorch to float32 rounding; ``jax.image.resize``'s cubic is another filter (a = -0.5,
    and antialiasing when downscaling).
    """
    rows = jnp.asarray(torch_bicubic_matrix(grid.shape[0], size[0]))
    cols = jnp.asarray(torch_bicubic_matrix(grid.shape[1], size[1]))
    return jnp.einsum(
        "yh,hwc,xw->yxc", rows, grid.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST
    )



# --- The vision tower -----------------------------------------------------------------------------


class CLIPVisionEmbeddings(nnx.Module):
    """Patch conv (no bias) + class token + position embeddings (optionally resized to the image)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c, f = config, config.initializer_factor
        self.image_size = c.image_size
        self.patch_size = c.patch_size
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(c.hidden_size**-0.5 * f)(rngs.params(), (c.hidden_size,), jnp.float32)
        )
        self.patch_embedding = nnx.Conv(
            c.num_channels,
            c.hidden_size,
            kernel_size=(c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.normal(c.initializer_range * f),
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            c.num_positions,
            c.hidden_size,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(c.initializer_range * f),
            rngs=rngs,
        )

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, height: int, width: int) -> jax.Array:
        """The (1 + grid_h * grid_w, D) float32 position table for a ``height`` x ``width`` image.

        As the reference: the class position is kept and the square patch-position grid is resized
        bicubically (PyTorch's kernel) to the image's patch grid. The table is used unchanged when
        the patch count equals the table's and the image is square.
        """
        table = self.position_embedding.embedding[...]
        num_positions = table.shape[0] - 1
        if grid_h * grid_w == num_positions and height == width:
            return table
        side = math.isqrt(num_positions)
        grid = table[1:].reshape(side, side, table.shape[1])
        patches = torch_bicubic_resize(grid, (grid_h, grid_w)).reshape(grid_h * grid_w, table.shape[1])
        return jnp.concatenate([table[:1], patches], axis=0)

    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        _, height, width, _ = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size}); "
                "pass interpolate_pos_encoding=True to resize the position embeddings"
            )
        patches = self.patch_embedding(pixel_values)
        b, grid_h, grid_w, d = patches.shape
        patches = patches.reshape(b, grid_h * grid_w, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, d))
        x = jnp.concatenate([cls, patches], axis=1)
        if interpolate_pos_encoding:
            positions = self.interpolate_pos_encoding(grid_h, grid_w, height, width)
        else:
            positions = self.position_embedding.embedding[...]
        return x + positions.astype(x.dtype)


class CLIPVision(nnx.Module):
    """The CLIP ViT image tower. It has no dropout except attention-probability dropout in training.

    ``dtype`` is the compute dtype; parameters are float32.
    """

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(
        self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False, output_hidden_states: bool = False
    ) -> TowerOutput:
        """Encodes NHWC images (B, H, W, C).

        Images other than ``image_size`` x ``image_size`` raise ``ValueError`` unless
        ``interpolate_pos_encoding`` is set, which resizes the position grid as the reference does.
        Returns ``last_hidden_state`` (B, 1 + patches, D), not post-normed; ``pooler_output``
        (B, D) = ``post_layernorm`` of the class token; on request ``hidden_states`` (the
        pre-normed embeddings and every layer's output). Arguments are checked by
        ``altjax.models.inputs.check_pixels`` (rank, channels, floating dtype, size); a mistake
        raises ``ValueError``.
        """
        c = self.config
        inputs.check_pixels(type(self).__name__, pixel_values, c.num_channels, nchw=False,
                            image_size=None if interpolate_pos_encoding else c.image_size)
        return self.forward(pixel_values, interpolate_pos_encoding, output_hidden_states)

    def forward(self, pixel_values, interpolate_pos_encoding=False, output_hidden_states=False) -> TowerOutput:
        """``__call__`` without the argument checks, for models that checked them at their own boundary."""
        h = self.embeddings(jnp.asarray(pixel_values), interpolate_pos_encoding)
        h, hidden_states = self.encoder(self.pre_layrnorm(h), output_hidden_states=output_hidden_states)
        return TowerOutput(
            last_hidden_state=h,
            pooler_output=self.post_layernorm(h[:, 0]),
            hidden_states=hidden_states,
        )



# --- transformers' state dict (``CLIPVisionModel`` / ``AltCLIPVisionModel``) ----------------------
# Keys relative to the tower: ``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.{i}.*``,
# ``post_layernorm.*``.

EMBEDDINGS = [
    Row("embeddings.class_embedding", "embeddings.class_embedding"),
    *conv_rows("embeddings.patch_embedding"),
    *embedding_rows("embeddings.position_embedding"),
    *layer_norm_rows("pre_layrnorm"),
]
HEAD = layer_norm_rows("post_layernorm")
# The embeddings' non-persistent ``position_ids`` buffer, which older checkpoints still contain.
IGNORED_BUFFERS = (r"embeddings\.position_ids$",)


def clip_vision_rows(config: CLIPVisionConfig) -> list[Row]:
    """Every tensor of the vision tower, keys relative to it (``embeddings.class_embedding``, ...),
    in the config's layer layout."""
    return EMBEDDINGS + encoder_rows(config.num_hidden_layers, config.scan_layers) + HEAD


def clip_vision_table(config: CLIPVisionConfig) -> Table:
    """The table of a standalone ``CLIPVisionModel`` / ``AltCLIPVisionModel`` state dict."""
    return Table(rows=tuple(clip_vision_rows(config)), ignore=IGNORED_BUFFERS)
