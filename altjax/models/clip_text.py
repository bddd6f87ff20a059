"""CLIP's text transformer, the distillation teacher of AltCLIP (transformers' ``CLIPTextModel``).

Token + position embeddings (no LayerNorm, no dropout), the pre-LN encoder layers shared with the
CLIP vision tower (``altjax.models.clip_transformer.CLIPEncoder``) under a causal mask,
``final_layer_norm`` on every token, and a pooled output taken at the end-of-text token. ``CLIPTextTeacher`` adds CLIP's
``text_projection`` (no bias): its projected pooled output is the target AltCLIP's phase-1
distillation regresses onto.

Attribute names mirror the PyTorch modules (``text_model.embeddings.token_embedding``,
``text_model.encoder.layers[i].self_attn.q_proj``, ``text_projection``) so that the tables of
transformers' state dicts at the end of this file read as a plain rename.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.model_io.engine import Row, Table, embedding_rows, layer_norm_rows, linear_rows, prefixed
from altjax.model_io.pretrained import PretrainedModel
from altjax.models import inputs, layers
from altjax.models.clip_transformer import CLIPEncoder, encoder_rows
from altjax.models.configuration import altjax_field, config_from_hf, config_to_hf
from altjax.models.outputs import TowerOutput

MODEL_TYPE = "clip_text_model"
CLIP_MODEL_TYPE = "clip"
# Configs written before transformers PR #24773 say eos_token_id=2; the reference then pools at the
# largest token id (CLIP's end-of-text, 49407, is the last id of its vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of HF ``CLIPTextConfig`` (the ViT-B/32 CLIP text defaults); unknown keys go to ``extra``.

    ``projection_dim`` is the width of ``CLIPTextTeacher.text_projection``. A ``CLIPModel``
    checkpoint keeps that width in its top-level ``projection_dim``, which
    ``CLIPTextTeacher.from_pretrained`` copies here. ``pad_token_id`` and ``bos_token_id`` are
    informational; ``eos_token_id`` chooses the pooled position. ``scan_layers`` is altjax's own (not
    written to HF configs): stacked encoder layers run by a scan.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: Optional[int] = 49407
    # Stacked layers run by one scan (compiled once, whatever the depth) instead of a loop.
    scan_layers: bool = altjax_field(False)
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be one int (the pooled token), got {self.eos_token_id!r}")

    @property
    def max_text_length(self) -> int:
        """The longest token sequence the tower can position-embed."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        """From an HF ``CLIPTextConfig`` dict; other keys (``model_type``, ...) go to ``extra``."""
        return config_from_hf(cls, d)

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict: fields, kept extra keys, and ``model_type`` if it was not kept."""
        d = config_to_hf(self)
        d.setdefault("model_type", MODEL_TYPE)
        return d


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The (B,) pooled position of each row, by the reference's two conventions.

    ``eos_token_id == 2`` (legacy configs): the position of the largest id (the first, on ties).
    Otherwise the first position holding ``eos_token_id`` (CLIP's tokenizer may pad with the same
    token), or 0 for a row that has none, as ``argmax`` gives in the reference.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEmbeddings(nnx.Module):
    """Token embeddings plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c, std = config, 0.02 * config.initializer_factor
        kwargs = dict(dtype=dtype, param_dtype=jnp.float32, embedding_init=nnx.initializers.normal(std), rngs=rngs)
        self.token_embedding = nnx.Embed(c.vocab_size, c.hidden_size, **kwargs)
        self.position_embedding = nnx.Embed(c.max_position_embeddings, c.hidden_size, **kwargs)

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPText(nnx.Module):
    """CLIP's text transformer. Only attention probabilities have dropout (in training).

    ``dtype`` is the compute dtype; parameters are float32.
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
    ) -> TowerOutput:
        """Encodes (B, L) token ids, L at most ``max_position_embeddings``.

        Every token attends itself and the tokens before it; ``attention_mask`` (B, L), 1 for tokens
        and 0 for padding, also hides the padded keys (the reference's causal + padding mask). A
        query that sees no key at all (a left pad) attends every key uniformly, as the reference's
        eager attention does (its sdpa path gives such rows other values; no other row reads them).
        ``position_ids`` default to ``arange(L)``.

        Returns ``last_hidden_state`` (B, L, D) after ``final_layer_norm``, ``pooler_output`` (B, D)
        its row at the end-of-text token (see ``eos_positions``), and on request ``hidden_states``
        (the embeddings and every layer's output, before ``final_layer_norm``). Arguments are
        checked by ``altjax.models.inputs.check_text`` (ids within the vocabulary when called
        eagerly; ranks, dtypes, shapes and the length always); a mistake raises ``ValueError``.
        """
        inputs.check_text(type(self).__name__, self.config, input_ids, attention_mask, None, position_ids)
        return self.forward(input_ids, attention_mask, position_ids, output_hidden_states)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False) -> TowerOutput:
        """``__call__`` without the argument checks, for models that checked them at their own boundary."""
        input_ids = jnp.asarray(input_ids)
        length = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.arange(length, dtype=jnp.int32)[None, :]
        mask = None if attention_mask is None else (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        h = self.embeddings(input_ids, jnp.asarray(position_ids))
        h, hidden_states = self.encoder(h, mask, is_causal=True, output_hidden_states=output_hidden_states)
        h = self.final_layer_norm(h)
        pooled = h[jnp.arange(h.shape[0]), eos_positions(input_ids, self.config.eos_token_id)]
        return TowerOutput(
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=hidden_states,
        )


# --- transformers' state dicts (``CLIPTextModel``, ``CLIPTextModelWithProjection``) ---------------
# Keys relative to the tower: ``embeddings.*``, ``encoder.layers.{i}.*``, ``final_layer_norm.*``.

EMBEDDINGS = [*embedding_rows("embeddings.token_embedding"), *embedding_rows("embeddings.position_embedding")]
HEAD = layer_norm_rows("final_layer_norm")
# The embeddings' non-persistent ``position_ids`` buffer, which older checkpoints still contain.
IGNORED_BUFFERS = (r"embeddings\.position_ids$",)
# What a CLIPModel checkpoint holds besides the teacher (text tower + text_projection).
NOT_TEACHER = (r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$")


def clip_text_rows(config: CLIPTextConfig) -> list[Row]:
    """Every tensor of the text tower, keys relative to it (``embeddings.token_embedding.weight``, ...),
    in the config's layer layout."""
    return EMBEDDINGS + encoder_rows(config.num_hidden_layers, config.scan_layers) + HEAD


def clip_text_table(config: CLIPTextConfig) -> Table:
    """The table of a standalone ``CLIPTextModel`` state dict."""
    return Table(rows=tuple(clip_text_rows(config)), ignore=IGNORED_BUFFERS)


def clip_teacher_table(config: CLIPTextConfig) -> Table:
    """``CLIPTextTeacher`` from a ``CLIPModel`` or ``CLIPTextModelWithProjection`` checkpoint.

    Reads ``text_model.*`` and ``text_projection.weight``; the vision tower, ``visual_projection``,
    ``logit_scale`` and stale ``position_ids`` buffers of a CLIPModel checkpoint are ignored (and so
    are not written back on export).
    """
    rows = prefixed(clip_text_rows(config), "text_model.", "text_model.") + linear_rows("text_projection", bias=False)
    return Table(rows=tuple(rows), ignore=NOT_TEACHER + IGNORED_BUFFERS)


class CLIPTextTeacher(PretrainedModel, nnx.Module):
    """CLIP's text tower and ``text_projection``: the teacher of AltCLIP's distillation.

    Equivalent to transformers' ``CLIPTextModelWithProjection`` (and to the text half of
    ``CLIPModel``). ``dtype`` is the compute dtype; parameters are float32.

    ``from_pretrained`` reads a ``CLIPTextModelWithProjection`` directory (model_type
    ``"clip_text_model"``) and a ``CLIPModel`` one (``"clip"``: its ``text_config`` with the
    top-level ``projection_dim``; the vision tower is not read).
    """

    model_type = MODEL_TYPE
    also_reads = (CLIP_MODEL_TYPE,)
    config_class = CLIPTextConfig
    conversion_table = staticmethod(clip_teacher_table)

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.text_model = CLIPText(config, dtype=dtype, rngs=rngs)
        self.text_projection = nnx.Linear(
            config.hidden_size,
            config.projection_dim,
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.normal(config.hidden_size**-0.5 * config.initializer_factor),
            rngs=rngs,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
    ) -> TowerOutput:
        """The text tower's output (``CLIPText.__call__``, with its checks); ``pooler_output`` is not projected."""
        inputs.check_text(type(self).__name__, self.config, input_ids, attention_mask, None, position_ids)
        return self.text_model.forward(input_ids, attention_mask, position_ids, output_hidden_states)

    def get_text_features(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """``text_projection(pooler_output)``, (B, projection_dim), unnormalised: the distillation target.

        The same as transformers' ``CLIPModel.get_text_features(...).pooler_output`` and
        ``CLIPTextModelWithProjection(...).text_embeds``. Arguments are checked as ``__call__`` checks them.
        """
        inputs.check_text(type(self).__name__, self.config, input_ids, attention_mask, None, position_ids)
        return self.text_projection(self.text_model.forward(input_ids, attention_mask, position_ids).pooler_output)

    @classmethod
    def config_from_hf(cls, d: dict[str, Any]) -> CLIPTextConfig:
        if d["model_type"] != CLIP_MODEL_TYPE:
            return CLIPTextConfig.from_hf(d)
        text = dict(d.get("text_config") or {})
        # CLIPModel's projection width is the top-level key; the text config's is unused there.
        text["projection_dim"] = d.get("projection_dim", CLIPTextConfig.projection_dim)
        return CLIPTextConfig.from_hf(text)
