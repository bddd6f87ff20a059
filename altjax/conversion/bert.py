"""Mapping between transformers' ``AlignTextModel`` / ``BertModel`` state dict and ``altjax.models.bert.Bert``.

Keys are relative to the text tower; a dual-encoder table places them under its prefix with
``engine.prefixed``. Legacy ``LayerNorm.gamma``/``beta`` spellings are handled by the engine.
"""
from __future__ import annotations

from altjax.conversion.engine import Row, Table
from altjax.models.bert import BertConfig


def _linear(name: str) -> list[Row]:
    return [Row(f"{name}.weight", f"{name}.kernel", "linear"), Row(f"{name}.bias", f"{name}.bias")]


def _layer_norm(name: str) -> list[Row]:
    return [Row(f"{name}.weight", f"{name}.scale"), Row(f"{name}.bias", f"{name}.bias")]


def _embedding(name: str) -> list[Row]:
    return [Row(f"{name}.weight", f"{name}.embedding")]


EMBEDDINGS = [
    *_embedding("embeddings.word_embeddings"),
    *_embedding("embeddings.position_embeddings"),
    *_embedding("embeddings.token_type_embeddings"),
    *_layer_norm("embeddings.LayerNorm"),
]

# One encoder layer; "{i}" is the layer index.
LAYER = [
    *_linear("encoder.layer.{i}.attention.self.query"),
    *_linear("encoder.layer.{i}.attention.self.key"),
    *_linear("encoder.layer.{i}.attention.self.value"),
    *_linear("encoder.layer.{i}.attention.output.dense"),
    *_layer_norm("encoder.layer.{i}.attention.output.LayerNorm"),
    *_linear("encoder.layer.{i}.intermediate.dense"),
    *_linear("encoder.layer.{i}.output.dense"),
    *_layer_norm("encoder.layer.{i}.output.LayerNorm"),
]

POOLER = _linear("pooler.dense")

# Non-persistent buffers of the embeddings that older checkpoints still contain (relative keys).
IGNORED_BUFFERS = (r"embeddings\.position_ids$", r"embeddings\.token_type_ids$")


def bert_rows(config: BertConfig) -> list[Row]:
    """Every tensor of the text tower, keys relative to it (``embeddings.word_embeddings.weight``, ...)."""
    rows = list(EMBEDDINGS)
    for i in range(config.num_hidden_layers):
        rows += [Row(r.torch.format(i=i), r.nnx.format(i=i), r.layout) for r in LAYER]
    return rows + POOLER


def bert_table(config: BertConfig) -> Table:
    """The table of a standalone text tower (``AlignTextModel`` or ``BertModel`` state dict)."""
    return Table(rows=tuple(bert_rows(config)), ignore=IGNORED_BUFFERS)
