"""Mapping between transformers' ``AltCLIPModel`` state dict and ``altjax.models.altclip.AltCLIPModel``.

Rows use the in-memory spelling (``encoder.layers.{i}`` in both towers). transformers registers the
rename ``layer.`` -> ``layers.`` for AltCLIP on load and reverts it for every key on save, so:

* the Hub layout (text ``encoder.layer.{i}``, vision ``encoder.layers.{i}``), the transformers-5
  layout (``layer.`` in both towers) and the in-memory layout all load (``ALIASES``);
* export writes what transformers 5's ``save_pretrained`` writes, ``layer.`` in both towers
  (``DISK_RENAMES``), which transformers 4 and 5 both load.
"""
from __future__ import annotations

from altjax.conversion import clip, xlm_roberta
from altjax.conversion.engine import Row, Table, prefixed
from altjax.models.altclip import AltCLIPConfig

HEAD = [
    Row("visual_projection.weight", "visual_projection.kernel", "linear"),
    Row("text_projection.weight", "text_projection.kernel", "linear"),
    Row("logit_scale", "logit_scale"),
]

# transformers' own rule for model_type "altclip" (conversion_mapping.py), applied to every key.
ALIASES = ((r"layer\.", "layers."),)
DISK_RENAMES = ((r"layers\.", "layer."),)

# The towers' non-persistent buffers (position/token-type ids) that old checkpoints may contain.
IGNORED_BUFFERS = tuple(r"^text_model\.roberta\." + p for p in xlm_roberta.IGNORED_BUFFERS) + tuple(
    r"^vision_model\." + p for p in clip.IGNORED_BUFFERS
)


def altclip_table(config: AltCLIPConfig) -> Table:
    """Every tensor of ``AltCLIPModel``: the text tower under ``text_model.``, the vision tower
    under ``vision_model.``, both projections and the logit scale."""
    rows = (
        prefixed(xlm_roberta.xlm_roberta_rows(config.text_config), "text_model.", "text_model.")
        + prefixed(clip.clip_vision_rows(config.vision_config), "vision_model.", "vision_model.")
        + HEAD
    )
    return Table(rows=tuple(rows), aliases=ALIASES, ignore=IGNORED_BUFFERS, disk_renames=DISK_RENAMES)
