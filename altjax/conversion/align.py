"""Mapping between transformers' ``AlignModel`` state dict and ``altjax.models.align.AlignModel``.

ALIGN's on-disk key names equal its ``state_dict()`` names, so the table needs no disk renames.
"""
from __future__ import annotations

from altjax.conversion.bert import IGNORED_BUFFERS, bert_rows
from altjax.conversion.efficientnet import efficientnet_rows
from altjax.conversion.engine import Row, Table, prefixed
from altjax.models.align import AlignConfig

HEAD = [
    Row("text_projection.weight", "text_projection.kernel", "linear"),
    Row("text_projection.bias", "text_projection.bias"),
    Row("temperature", "temperature"),
]


def align_table(config: AlignConfig) -> Table:
    """Every tensor of ``AlignModel``: the text tower under ``text_model.``, the vision tower under
    ``vision_model.``, the text projection and the temperature."""
    rows = (
        prefixed(bert_rows(config.text_config), "text_model.", "text_model.")
        + prefixed(efficientnet_rows(config.vision_config), "vision_model.", "vision_model.")
        + HEAD
    )
    # Older checkpoints still contain the text embeddings' non-persistent id buffers.
    ignore = tuple("^text_model\\." + pattern for pattern in IGNORED_BUFFERS)
    return Table(rows=tuple(rows), ignore=ignore)
