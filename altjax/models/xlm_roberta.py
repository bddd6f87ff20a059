"""XLM-RoBERTa, the text tower of AltCLIP (transformers' ``AltCLIPTextModel``).

``XLMRoberta`` is the bare encoder (transformers' ``AltRobertaModel`` without pooler, the same
network as ``XLMRobertaModel(add_pooling_layer=False)``): RoBERTa embeddings, then post-LN layers
that have exactly BERT's structure and names, so they are ``altjax.models.bert.BertLayer``. What
differs from BERT is only the embeddings' position ids (counted over non-pad tokens, starting after
the pad id) and the padding row of the position table. ``AltCLIPText`` adds AltCLIP's head: a
LayerNorm over every token (``pre_LN``) and a Linear to ``project_dim`` (``transformation``); its
pooled output is token 0 (``<s>``) of the transformed sequence.

Attribute names mirror the PyTorch modules (``roberta.encoder.layers[i].attention.self.query``, ...)
so that the table of transformers' state dict at the end of this file reads as a plain rename.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.model_io.engine import Row, Table, layer_norm_rows, linear_rows, prefixed, repeated
from altjax.models import bert, inputs, layers
from altjax.models.bert import BertEmbeddings
from altjax.models.configuration import altjax_field, config_from_hf, config_to_hf
from altjax.models.outputs import TowerOutput

MODEL_TYPE = "altclip_text_model"


@dataclasses.dataclass(frozen=True)
class XLMRobertaConfig:
    """The fields of HF ``AltCLIPTextConfig`` (XLM-R large defaults); unknown keys are kept in ``extra``.

    ``project_dim`` is the width of AltCLIP's ``transformation`` head. The bare ``XLMRoberta``
    ignores it and ``initializer_factor``.
    """

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    initializer_factor: float = 0.02
    pad_token_id: int = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    project_dim: int = 768
    # altjax's own (not written to HF configs): the encoder layers stacked and run by one scan.
    scan_layers: bool = altjax_field(False)
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.pad_token_id is None:
            raise ValueError("XLM-R needs pad_token_id: its position ids are counted from it")

    @property
    def max_text_length(self) -> int:
        """The longest token sequence the tower can position-embed: XLM-R numbers positions from
        ``pad_token_id + 1``; beyond this a lookup would silently read past the table."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "XLMRobertaConfig":
        """From an HF ``AltCLIPTextConfig`` dict; other keys (``model_type``, ...) go to ``extra``."""
        return config_from_hf(cls, d)

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict: fields, kept extra keys, and ``model_type`` if it was not kept."""
        d = config_to_hf(self)
        d.setdefault("model_type", MODEL_TYPE)
        return d


def create_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """RoBERTa's position ids: non-pad tokens count ``pad+1, pad+2, ...`` (skipping pads); pads get ``pad``.

    So with pad id 1 a row ``[0, 5, 6, 2, 1, 1]`` gets ``[2, 3, 4, 5, 1, 1]``, and the longest
    usable sequence is ``max_position_embeddings - pad_token_id - 1`` tokens.
    """
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class XLMRobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings with RoBERTa's position ids and a padding row in the position table too."""

    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, position_ids: Optional[jax.Array] = None
    ) -> jax.Array:
        if position_ids is None:
            position_ids = create_position_ids(input_ids, self.pad_token_id)
        words = self.word_embeddings(input_ids)
        positions = self.position_embeddings(position_ids)
        # Both PyTorch tables are Embedding(padding_idx=pad): the pad row of either never gets a
        # gradient. Pads look up position row ``pad`` (see create_position_ids).
        words = jnp.where((input_ids == self.pad_token_id)[..., None], jax.lax.stop_gradient(words), words)
        positions = jnp.where(
            (position_ids == self.pad_token_id)[..., None], jax.lax.stop_gradient(positions), positions
        )
        x = words + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x + positions))


class XLMRoberta(nnx.Module):
    """The bare XLM-R encoder (no pooler). Built in eval mode; ``model.train()`` turns dropout on.

    ``dtype`` is the compute dtype; parameters are float32.
    """

    def __init__(self, config: XLMRobertaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = XLMRobertaEmbeddings(config, dtype=dtype, rngs=rngs)
        # AltCLIP names the layer list ``layers`` in memory (``layer`` on disk; the table reads both).
        self.encoder = bert.BertEncoder(config, name="layers", dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
    ) -> TowerOutput:
        """Encodes (B, L) token ids.

        ``attention_mask`` is (B, L), 1 for tokens to attend and 0 for padding. As in the
        reference, None means no mask at all: pad tokens are attended (the model never infers a
        mask from ``pad_token_id``). ``position_ids`` default to ``create_position_ids(input_ids)``
        and ``token_type_ids`` to zeros. Returns ``last_hidden_state`` (B, L, D),
        ``pooler_output=None`` (there is no pooler), and on request ``hidden_states`` (the embedding
        output and every layer's output). Arguments are checked by
        ``altjax.models.inputs.check_text`` (ids and counted positions within their tables when
        called eagerly; ranks, dtypes and shapes always); a mistake raises ``ValueError``.
        """
        inputs.check_text(type(self).__name__, self.config, input_ids, attention_mask, token_type_ids, position_ids,
                          roberta_positions=True)
        return self.forward(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False) -> TowerOutput:
        """``__call__`` without the argument checks, for models that checked them at their own boundary."""
        input_ids = jnp.asarray(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, dtype=jnp.int32)
        if position_ids is not None:
            position_ids = jnp.asarray(position_ids)
        # A boolean key mask broadcast over heads and queries: the same softmax as sdpa's bool mask.
        mask = None if attention_mask is None else (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        h = self.embeddings(input_ids, jnp.asarray(token_type_ids), position_ids)
        h, hidden_states = self.encoder(h, mask, output_hidden_states)
        return TowerOutput(last_hidden_state=h, pooler_output=None, hidden_states=hidden_states)


class AltCLIPText(nnx.Module):
    """AltCLIP's text tower: ``XLMRoberta``, then ``pre_LN`` on every token, then ``transformation``.

    Built in eval mode; ``model.train()`` turns dropout on. ``dtype`` is the compute dtype;
    parameters are float32.
    """

    def __init__(self, config: XLMRobertaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.roberta = XLMRoberta(config, dtype=dtype, rngs=rngs)
        self.transformation = layers.linear(config.hidden_size, config.project_dim, dtype=dtype, rngs=rngs)
        self.pre_LN = layers.layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
    ) -> TowerOutput:
        """Encodes (B, L) token ids (arguments as ``XLMRoberta.__call__``).

        Returns ``last_hidden_state = transformation(pre_LN(h))`` (B, L, project_dim),
        ``pooler_output`` its token 0 (B, project_dim), and on request the encoder's
        ``hidden_states`` (before ``pre_LN``), as the reference does. Arguments are checked as
        ``XLMRoberta.__call__`` checks them.
        """
        inputs.check_text(type(self).__name__, self.config, input_ids, attention_mask, token_type_ids, position_ids,
                          roberta_positions=True)
        return self.forward(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False) -> TowerOutput:
        """``__call__`` without the argument checks, for models that checked them at their own boundary."""
        out = self.roberta.forward(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        projected = self.transformation(self.pre_LN(out.last_hidden_state))
        return TowerOutput(last_hidden_state=projected, pooler_output=projected[:, 0], hidden_states=out.hidden_states)


# --- transformers' state dict (``AltCLIPTextModel``) ----------------------------------------------
# Keys relative to the tower, in the in-memory spelling ``roberta.encoder.layers.{i}``; checkpoints
# write ``roberta.encoder.layer.{i}`` (transformers' AltCLIP conversion mapping), which ``ALIASES``
# accepts. The embeddings and layers have BERT's names, so their rows are BERT's rows.


def _in_layers(row: Row) -> Row:
    # AltCLIP's roberta keeps its layer list as ``encoder.layers`` in memory (BERT: ``encoder.layer``).
    old, new = "encoder.layer.", "encoder.layers."
    return dataclasses.replace(row, torch=row.torch.replace(old, new), nnx=row.nnx.replace(old, new))


HEAD = [*layer_norm_rows("pre_LN"), *linear_rows("transformation")]

# The on-disk spelling (``encoder.layer.{i}``, also XLMRobertaModel's) -> the in-memory one.
ALIASES = ((r"encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),)

# Non-persistent buffers of the embeddings (BERT's, the same names) that old checkpoints may contain.
IGNORED_BUFFERS = bert.IGNORED_BUFFERS


def roberta_rows(config: XLMRobertaConfig) -> list[Row]:
    """Every tensor of the bare encoder (``XLMRoberta``), keys relative to it
    (``embeddings.LayerNorm.weight``, ``encoder.layers.{i}.*``); with ``scan_layers`` layer i's
    tensors fill index i of the stacked ``encoder.layers.*``."""
    layer = [_in_layers(r) for r in bert.LAYER]
    return bert.EMBEDDINGS + repeated(layer, config.num_hidden_layers, stacked=config.scan_layers)


def xlm_roberta_rows(config: XLMRobertaConfig) -> list[Row]:
    """Every tensor of ``AltCLIPTextModel``, keys relative to it (``roberta.embeddings.LayerNorm.weight``, ...)."""
    return prefixed(roberta_rows(config), "roberta.", "roberta.") + HEAD


def xlm_roberta_table(config: XLMRobertaConfig) -> Table:
    """The table of a standalone ``AltCLIPTextModel`` state dict; both layer spellings load."""
    return Table(rows=tuple(xlm_roberta_rows(config)), aliases=ALIASES, ignore=IGNORED_BUFFERS)
