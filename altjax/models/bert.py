"""BERT, the text tower of ALIGN (transformers' ``AlignTextModel``, the same network as ``BertModel``).

Post-LayerNorm transformer encoder: word + position + token-type embeddings, LayerNorm, dropout;
then ``num_hidden_layers`` layers of self-attention and a feed-forward block, each followed by
dropout and ``LayerNorm(x + residual)``; with the config's ``scan_layers`` the layers are stacked and
run by a scan (``altjax.models.stack``). Module attribute names mirror the PyTorch module names
(``embeddings.LayerNorm``, ``encoder.layer[i].attention.self.query``, ...) so that the table of
transformers' state dict at the end of this file reads as a plain rename.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.model_io.engine import Row, Table, embedding_rows, layer_norm_rows, linear_rows, repeated
from altjax.models import inputs, layers, stack
from altjax.models.configuration import altjax_field, config_from_hf, config_to_hf
from altjax.models.outputs import TowerOutput


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of HF ``AlignTextConfig`` (BERT-base defaults); unknown keys are kept in ``extra``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # altjax's own (not written to HF configs): the encoder layers stacked and run by one scan
    # (compiled once, whatever the depth) instead of a loop.
    scan_layers: bool = altjax_field(False)
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @property
    def max_text_length(self) -> int:
        """The longest token sequence the tower can position-embed."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "BertConfig":
        """From an HF ``AlignTextConfig`` / ``BertConfig`` dict; other keys go to ``extra``."""
        return config_from_hf(cls, d)

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict (fields followed by the kept extra keys)."""
        return config_to_hf(self)


class BertEmbeddings(nnx.Module):
    """Word + token-type + position embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.pad_token_id = c.pad_token_id
        self.word_embeddings = layers.embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embeddings = layers.embedding(c.max_position_embeddings, c.hidden_size, dtype=dtype, rngs=rngs)
        self.token_type_embeddings = layers.embedding(c.type_vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = layers.layer_norm(c.hidden_size, c.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(c.hidden_dropout_prob, deterministic=True, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        words = self.word_embeddings(input_ids)
        if self.pad_token_id is not None:
            # PyTorch's Embedding(padding_idx=pad) never sends a gradient to the padding row; lookups
            # of that row are cut from the graph so training updates the same parameters.
            is_pad = (input_ids == self.pad_token_id)[..., None]
            words = jnp.where(is_pad, jax.lax.stop_gradient(words), words)
        x = words + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nnx.Module):
    """Multi-head self-attention projections; softmax in float32 with attention-prob dropout."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = layers.linear(d, d, dtype=dtype, rngs=rngs)
        self.key = layers.linear(d, d, dtype=dtype, rngs=rngs)
        self.value = layers.linear(d, d, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        return layers.dot_product_attention(
            self.query(x), self.key(x), self.value(x), num_heads=self.num_heads, mask=mask, dropout=self.dropout
        )


class BertSelfOutput(nnx.Module):
    """Dense, dropout, ``LayerNorm(x + residual)``: shared shape of both post-LN sub-blocks."""

    def __init__(self, din: int, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = layers.linear(din, config.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, dtype=dtype, rngs=rngs)
        self.output = BertSelfOutput(config.hidden_size, config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = layers.linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.act = layers.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    """One post-LN encoder layer: attention block, then feed-forward block."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.attention = BertAttention(config, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(config, dtype=dtype, rngs=rngs)
        self.output = BertSelfOutput(config.intermediate_size, config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nnx.Module):
    """``num_hidden_layers`` layers: ``layer[i]``, or with ``config.scan_layers`` one stacked
    ``layer`` run by a scan; each rematerialised under ``remat_policy`` (see :mod:`altjax.models.stack`).
    ``name`` is the attribute holding them: ``layer`` in BERT, ``layers`` in AltCLIP's XLM-R."""

    def __init__(self, config: Any, *, name: str = "layer", dtype=jnp.float32, rngs: nnx.Rngs):
        self.scan_layers = config.scan_layers
        self.remat_policy: Optional[str] = None
        self.name = name
        setattr(self, name, stack.build(lambda r: BertLayer(config, dtype=dtype, rngs=r), config.num_hidden_layers,
                                        scan=config.scan_layers, rngs=rngs))

    def __call__(self, h: jax.Array, mask: Optional[jax.Array], output_hidden_states: bool = False):
        """The last layer's output and, on request, every hidden state (input and layer outputs)."""
        return stack.run(getattr(self, self.name), h, lambda layer, x: layer(x, mask), scan=self.scan_layers,
                         remat_policy=self.remat_policy, output_hidden_states=output_hidden_states)


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))``. Kept for checkpoint completeness; ALIGN's embeddings do not use it."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = layers.linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(h[:, 0]))


class Bert(nnx.Module):
    """The BERT text tower. Built in eval mode (dropout off); ``model.train()`` turns dropout on.

    ``dtype`` is the compute dtype; parameters are float32.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = BertEncoder(config, dtype=dtype, rngs=rngs)
        self.pooler = BertPooler(config, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
    ) -> TowerOutput:
        """Encodes (B, L) token ids.

        ``attention_mask`` is (B, L) with 1 for tokens to attend and 0 for padding; None attends
        everything. ``position_ids`` default to ``arange(L)`` and ``token_type_ids`` to zeros.
        Returns ``last_hidden_state`` (B, L, D) and ``pooler_output`` (B, D), the tanh pooler on
        token 0; ``hidden_states`` (the embedding output and every layer's output) on request.
        Arguments are checked by ``altjax.models.inputs.check_text`` (ids within the vocabulary
        when called eagerly; ranks, dtypes and shapes always); a mistake raises ``ValueError``.
        """
        inputs.check_text(type(self).__name__, self.config, input_ids, attention_mask, token_type_ids, position_ids)
        return self.forward(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False) -> TowerOutput:
        """``__call__`` without the argument checks, for models that checked them at their own boundary."""
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        if position_ids is None:
            position_ids = jnp.arange(length, dtype=jnp.int32)[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, length), dtype=jnp.int32)
        # A boolean key mask, broadcast over heads and queries; it gives the same softmax as the
        # reference's additive finfo.min mask.
        mask = None if attention_mask is None else (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        h = self.embeddings(input_ids, jnp.asarray(token_type_ids), jnp.asarray(position_ids))
        h, hidden_states = self.encoder(h, mask, output_hidden_states)
        return TowerOutput(last_hidden_state=h, pooler_output=self.pooler(h), hidden_states=hidden_states)


# --- transformers' state dict (``AlignTextModel`` / ``BertModel``) --------------------------------
# Keys relative to the tower; a dual encoder places them under its prefix with ``engine.prefixed``.
# The legacy ``LayerNorm.gamma`` / ``beta`` spellings are handled by the engine.

EMBEDDINGS = [
    *embedding_rows("embeddings.word_embeddings"),
    *embedding_rows("embeddings.position_embeddings"),
    *embedding_rows("embeddings.token_type_embeddings"),
    *layer_norm_rows("embeddings.LayerNorm"),
]

# One encoder layer; "{i}" is the layer index.
LAYER = [
    *linear_rows("encoder.layer.{i}.attention.self.query"),
    *linear_rows("encoder.layer.{i}.attention.self.key"),
    *linear_rows("encoder.layer.{i}.attention.self.value"),
    *linear_rows("encoder.layer.{i}.attention.output.dense"),
    *layer_norm_rows("encoder.layer.{i}.attention.output.LayerNorm"),
    *linear_rows("encoder.layer.{i}.intermediate.dense"),
    *linear_rows("encoder.layer.{i}.output.dense"),
    *layer_norm_rows("encoder.layer.{i}.output.LayerNorm"),
]

POOLER = linear_rows("pooler.dense")

# Non-persistent buffers of the embeddings that older checkpoints still contain (relative keys).
IGNORED_BUFFERS = (r"embeddings\.position_ids$", r"embeddings\.token_type_ids$")


def bert_rows(config: BertConfig) -> list[Row]:
    """Every tensor of the text tower, keys relative to it (``embeddings.word_embeddings.weight``, ...);
    with ``scan_layers`` layer i's tensors fill index i of the stacked ``encoder.layer.*``."""
    return EMBEDDINGS + repeated(LAYER, config.num_hidden_layers, stacked=config.scan_layers) + POOLER


def bert_table(config: BertConfig) -> Table:
    """The table of a standalone text tower (an ``AlignTextModel`` or ``BertModel`` state dict)."""
    return Table(rows=tuple(bert_rows(config)), ignore=IGNORED_BUFFERS)
