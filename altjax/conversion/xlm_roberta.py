"""Mapping between transformers' ``AltCLIPTextModel`` state dict and ``altjax.models.xlm_roberta.AltCLIPText``.

Keys are relative to the text tower and use the in-memory spelling ``roberta.encoder.layers.{i}``;
checkpoints write ``roberta.encoder.layer.{i}`` (transformers' AltCLIP conversion mapping), which
``ALIASES`` accepts. The embeddings and layers have BERT's names, so their rows are BERT's rows.
"""
from __future__ import annotations

from altjax.conversion import bert
from altjax.conversion.engine import Row, Table, prefixed
from altjax.models.xlm_roberta import XLMRobertaConfig


def _in_layers(row: Row) -> Row:
    # AltCLIP's roberta keeps its layer list as ``encoder.layers`` in memory (BERT: ``encoder.layer``).
    old, new = "encoder.layer.", "encoder.layers."
    return Row(row.torch.replace(old, new), row.nnx.replace(old, new), row.layout)


EMBEDDINGS = prefixed(bert.EMBEDDINGS, "roberta.", "roberta.")

# One encoder layer; "{i}" is the layer index.
LAYER = [_in_layers(r) for r in prefixed(bert.LAYER, "roberta.", "roberta.")]

HEAD = [
    Row("pre_LN.weight", "pre_LN.scale"),
    Row("pre_LN.bias", "pre_LN.bias"),
    Row("transformation.weight", "transformation.kernel", "linear"),
    Row("transformation.bias", "transformation.bias"),
]

# The on-disk spelling (``encoder.layer.{i}``, also XLMRobertaModel's) -> the in-memory one.
ALIASES = ((r"encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),)

# Non-persistent buffers of the embeddings (BERT's, the same names) that old checkpoints may contain.
IGNORED_BUFFERS = bert.IGNORED_BUFFERS


def xlm_roberta_rows(config: XLMRobertaConfig) -> list[Row]:
    """Every tensor of ``AltCLIPTextModel``, keys relative to it (``roberta.embeddings.LayerNorm.weight``, ...)."""
    rows = list(EMBEDDINGS)
    for i in range(config.num_hidden_layers):
        rows += [Row(r.torch.format(i=i), r.nnx.format(i=i), r.layout) for r in LAYER]
    return rows + HEAD


def xlm_roberta_table(config: XLMRobertaConfig) -> Table:
    """The table of a standalone ``AltCLIPTextModel`` state dict; both layer spellings load."""
    return Table(rows=tuple(xlm_roberta_rows(config)), aliases=ALIASES, ignore=IGNORED_BUFFERS)
