"""Mapping between transformers' CLIP towers and ``altjax.models.vit`` / ``altjax.models.clip_text``.

``clip_vision_rows`` covers ``CLIPVisionModel`` / ``AltCLIPVisionModel`` (keys relative to the tower:
``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.{i}.*``, ``post_layernorm.*``);
``clip_text_rows`` covers ``CLIPTextModel``. Both use the in-memory spelling ``encoder.layers.{i}``;
AltCLIP checkpoints saved by transformers 5 write ``encoder.layer.{i}``, an alias that belongs to
AltCLIP's table. ``clip_table`` covers the whole ``CLIPModel`` (``altjax.models.clip``): both
towers, both projections and ``logit_scale``; transformers has no key renames for CLIP, so its
files hold the state-dict spelling. ``clip_teacher_table`` reads the text tower and
``text_projection`` of a ``CLIPModel`` (or ``CLIPTextModelWithProjection``) checkpoint and ignores
the rest.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from altjax.conversion.engine import Row, Table, prefixed
from altjax.models.clip_text import CLIPTextConfig
from altjax.models.vit import CLIPVisionConfig

if TYPE_CHECKING:
    from altjax.models.clip import CLIPConfig


def _linear(name: str) -> list[Row]:
    return [Row(f"{name}.weight", f"{name}.kernel", "linear"), Row(f"{name}.bias", f"{name}.bias")]


def _layer_norm(name: str) -> list[Row]:
    return [Row(f"{name}.weight", f"{name}.scale"), Row(f"{name}.bias", f"{name}.bias")]


# One encoder layer of either tower; "{i}" is the layer index.
LAYER = [
    *_linear("encoder.layers.{i}.self_attn.k_proj"),
    *_linear("encoder.layers.{i}.self_attn.v_proj"),
    *_linear("encoder.layers.{i}.self_attn.q_proj"),
    *_linear("encoder.layers.{i}.self_attn.out_proj"),
    *_layer_norm("encoder.layers.{i}.layer_norm1"),
    *_linear("encoder.layers.{i}.mlp.fc1"),
    *_linear("encoder.layers.{i}.mlp.fc2"),
    *_layer_norm("encoder.layers.{i}.layer_norm2"),
]

VISION_EMBEDDINGS = [
    Row("embeddings.class_embedding", "embeddings.class_embedding"),
    Row("embeddings.patch_embedding.weight", "embeddings.patch_embedding.kernel", "conv"),
    Row("embeddings.position_embedding.weight", "embeddings.position_embedding.embedding"),
    *_layer_norm("pre_layrnorm"),
]
VISION_HEAD = _layer_norm("post_layernorm")

TEXT_EMBEDDINGS = [
    Row("embeddings.token_embedding.weight", "embeddings.token_embedding.embedding"),
    Row("embeddings.position_embedding.weight", "embeddings.position_embedding.embedding"),
]
TEXT_HEAD = _layer_norm("final_layer_norm")

# The embeddings' non-persistent ``position_ids`` buffer, which older checkpoints still contain.
IGNORED_BUFFERS = (r"embeddings\.position_ids$",)
# CLIPModel's head, on the model itself.
HEAD = [
    Row("visual_projection.weight", "visual_projection.kernel", "linear"),
    Row("text_projection.weight", "text_projection.kernel", "linear"),
    Row("logit_scale", "logit_scale"),
]
# What a CLIPModel checkpoint holds besides the teacher (text tower + text_projection).
NOT_TEACHER = (r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$")


def _layers(num_layers: int) -> list[Row]:
    return [Row(r.torch.format(i=i), r.nnx.format(i=i), r.layout) for i in range(num_layers) for r in LAYER]


def clip_vision_rows(config: CLIPVisionConfig) -> list[Row]:
    """Every tensor of the CLIP vision tower, keys relative to it (``embeddings.class_embedding``, ...)."""
    return VISION_EMBEDDINGS + _layers(config.num_hidden_layers) + VISION_HEAD


def clip_text_rows(config: CLIPTextConfig) -> list[Row]:
    """Every tensor of the CLIP text tower, keys relative to it (``embeddings.token_embedding.weight``, ...)."""
    return TEXT_EMBEDDINGS + _layers(config.num_hidden_layers) + TEXT_HEAD


def clip_vision_table(config: CLIPVisionConfig) -> Table:
    """The table of a standalone ``CLIPVisionModel`` / ``AltCLIPVisionModel`` state dict."""
    return Table(rows=tuple(clip_vision_rows(config)), ignore=IGNORED_BUFFERS)


def clip_text_table(config: CLIPTextConfig) -> Table:
    """The table of a standalone ``CLIPTextModel`` state dict."""
    return Table(rows=tuple(clip_text_rows(config)), ignore=IGNORED_BUFFERS)


def clip_teacher_table(config: CLIPTextConfig) -> Table:
    """``CLIPTextTeacher`` from a ``CLIPModel`` or ``CLIPTextModelWithProjection`` checkpoint.

    Reads ``text_model.*`` and ``text_projection.weight``; the vision tower, ``visual_projection``,
    ``logit_scale`` and stale ``position_ids`` buffers of a CLIPModel checkpoint are ignored (and so
    are not written back on export).
    """
    rows = prefixed(clip_text_rows(config), "text_model.", "text_model.")
    rows.append(Row("text_projection.weight", "text_projection.kernel", "linear"))
    return Table(rows=tuple(rows), ignore=NOT_TEACHER + IGNORED_BUFFERS)


def clip_table(config: CLIPConfig) -> Table:
    """Every tensor of ``CLIPModel``: the text tower under ``text_model.``, the vision tower under
    ``vision_model.``, both projections and the logit scale. Stale ``position_ids`` buffers of
    either tower are ignored on import."""
    rows = (
        prefixed(clip_text_rows(config.text_config), "text_model.", "text_model.")
        + prefixed(clip_vision_rows(config.vision_config), "vision_model.", "vision_model.")
        + HEAD
    )
    ignore = tuple(rf"^{tower}\." + p for tower in ("text_model", "vision_model") for p in IGNORED_BUFFERS)
    return Table(rows=tuple(rows), ignore=ignore)
