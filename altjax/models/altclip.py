"""AltCLIP: a CLIP ViT image tower and an XLM-R text tower trained with a contrastive loss.

Port of transformers' ``AltCLIPModel``. The image embedding is ``visual_projection`` (no bias) of
the vision tower's pooled output (``post_layernorm`` of the CLS token); the text embedding is
``text_projection`` (no bias) of the text tower's pooled output (token 0 of
``transformation(pre_LN(h))``). Logits are cosine similarities times ``exp(logit_scale)`` (no clamp)
and the loss is the plain symmetric cross-entropy; everything but the text tower is CLIP's
(``altjax.models.dual_encoder``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from altjax.model_io.engine import Row, Table, linear_rows, prefixed
from altjax.models import vit, xlm_roberta
from altjax.models.dual_encoder import DualEncoder, DualEncoderConfig
from altjax.models.outputs import DualEncoderOutput
from altjax.models.vit import CLIPVisionConfig
from altjax.models.xlm_roberta import AltCLIPText, XLMRobertaConfig

MODEL_TYPE = "altclip"


@dataclasses.dataclass(frozen=True)
class AltCLIPConfig(DualEncoderConfig):
    """HF ``AltCLIPConfig``: the two tower configs, projection width and initial logit scale.

    The class defaults are transformers' (ViT-B/32 vision, XLM-R large text); the released AltCLIP
    is the ``"altclip"`` preset (ViT-L/14).
    """

    text_config: XLMRobertaConfig = dataclasses.field(default_factory=XLMRobertaConfig)
    projection_dim: int = 768

    model_type = MODEL_TYPE
    text_model_type = xlm_roberta.MODEL_TYPE
    vision_model_type = "altclip_vision_model"
    text_config_class = XLMRobertaConfig
    described_as = "an AltCLIP"

    @classmethod
    def from_preset(cls, name: str) -> "AltCLIPConfig":
        """A named configuration: ``"altclip"``, ``"altclip-b32"`` or ``"altclip-tiny"`` (see ``PRESETS``)."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown AltCLIP preset {name!r}; known: {sorted(PRESETS)}") from None


def _altclip() -> AltCLIPConfig:
    # BAAI/AltCLIP: CLIP ViT-L/14 at 224 px (the paper's image tower and teacher), XLM-R large,
    # 768-wide projections. Its config.json sets attention-probs dropout 0.1 (class default 0).
    return AltCLIPConfig(
        text_config=XLMRobertaConfig(attention_probs_dropout_prob=0.1),
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=768,
        ),
        projection_dim=768,
    )


def _altclip_b32() -> AltCLIPConfig:
    # transformers' class defaults: CLIP ViT-B/32 at 224 px and XLM-R large.
    return AltCLIPConfig()


def _altclip_tiny() -> AltCLIPConfig:
    # Two narrow layers per tower. XLM-R's vocabulary and positions, and 224 px images, so that the
    # real AltCLIPProcessor (tokenizer and CLIP image processor) can feed it.
    return AltCLIPConfig(
        text_config=XLMRobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, project_dim=24
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=224,
            patch_size=32, projection_dim=16,
        ),
        projection_dim=16,
    )


PRESETS = {"altclip": _altclip, "altclip-b32": _altclip_b32, "altclip-tiny": _altclip_tiny}


# --- transformers' state dict (``AltCLIPModel``) --------------------------------------------------
# Rows use the in-memory spelling (``encoder.layers.{i}`` in both towers). transformers registers the
# rename ``layer.`` -> ``layers.`` for AltCLIP on load and reverts it for every key on save, so:
#
# * the Hub layout (text ``encoder.layer.{i}``, vision ``encoder.layers.{i}``), the transformers-5
#   layout (``layer.`` in both towers) and the in-memory layout all load (``ALIASES``);
# * export writes what transformers 5's ``save_pretrained`` writes, ``layer.`` in both towers
#   (``DISK_RENAMES``), which transformers 4 and 5 both load.

HEAD = [*linear_rows("visual_projection", bias=False), *linear_rows("text_projection", bias=False),
        Row("logit_scale", "logit_scale")]

# transformers' own rule for model_type "altclip" (conversion_mapping.py), applied to every key.
ALIASES = ((r"layer\.", "layers."),)
DISK_RENAMES = ((r"layers\.", "layer."),)

# The towers' non-persistent buffers (position/token-type ids) that old checkpoints may contain.
IGNORED_BUFFERS = tuple(r"^text_model\.roberta\." + p for p in xlm_roberta.IGNORED_BUFFERS) + tuple(
    r"^vision_model\." + p for p in vit.IGNORED_BUFFERS
)


def altclip_table(config: AltCLIPConfig) -> Table:
    """Every tensor of ``AltCLIPModel``: the text tower under ``text_model.``, the vision tower
    under ``vision_model.``, both projections and the logit scale."""
    rows = (
        prefixed(xlm_roberta.xlm_roberta_rows(config.text_config), "text_model.", "text_model.")
        + prefixed(vit.clip_vision_rows(config.vision_config), "vision_model.", "vision_model.")
        + HEAD
    )
    return Table(rows=tuple(rows), aliases=ALIASES, ignore=IGNORED_BUFFERS, disk_renames=DISK_RENAMES)


class AltCLIPModel(DualEncoder):
    """AltCLIP dual encoder with the attribute names of transformers' ``AltCLIPModel``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32,
    and normalisation, logits and loss are computed in float32. Built in eval mode; ``train()``
    turns dropout on. ``from_pretrained`` reads both HF key spellings: the Hub's (text
    ``encoder.layer.{i}``, vision ``encoder.layers.{i}``) and transformers 5's (``layer.`` for both).
    """

    model_type = MODEL_TYPE
    config_class = AltCLIPConfig
    conversion_table = staticmethod(altclip_table)
    text_tower = AltCLIPText
    roberta_positions = True

    @staticmethod
    def text_features_dim(text_config: XLMRobertaConfig) -> int:
        # AltCLIP's text tower ends in ``transformation``, to project_dim.
        return text_config.project_dim

    def get_text_features(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Unnormalised text features ``text_projection(pooler_output)``, shape (B, projection_dim).

        As in the reference, no mask is applied when ``attention_mask`` is None (pads are attended).
        Unlike transformers, which returns the text model's output object with these features in
        ``pooler_output``, this returns the array itself.
        """
        self._check_text(input_ids, attention_mask, position_ids, token_type_ids)
        return self._text(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          position_ids=position_ids)[1]

    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        pixel_values: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        return_loss: bool = False,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> DualEncoderOutput:
        """Embeds texts and images and scores every pair.

        The arguments are checked first (``altjax.models.inputs``), here and in
        ``get_text_features`` / ``get_image_features``: a wrong rank, dtype, shape or channel count,
        and, when called eagerly, a token id outside the vocabulary or a position beyond
        ``max_position_embeddings``, raise ``ValueError`` naming the argument. Under ``jax.jit`` only
        the shape and dtype checks run (the value checks are skipped; the compiled step is unchanged).

        ``pixel_values`` are NHWC (B, H, W, C) as altjax processors produce them; an NCHW array
        (B, C, H, W), as HF processors produce, is transposed when its last dimension is not C and
        its second is. Images of another size than ``image_size`` need
        ``interpolate_pos_encoding=True`` (bicubic resize of the position grid, as the reference).
        Without ``attention_mask`` the text tower attends the pad tokens, as the reference does.

        Returns ``text_embeds`` and ``image_embeds`` (L2-normalised), ``logits_per_text`` =
        ``text_embeds @ image_embeds.T * exp(logit_scale)`` and ``logits_per_image``, its
        transpose; with ``return_loss``, the symmetric cross-entropy (texts and images paired by
        index). ``text_model_output.last_hidden_state`` is the transformed sequence (B, L,
        project_dim); ``vision_model_output.last_hidden_state`` is (B, N+1, D), not post-normed.
        """
        text_arguments = dict(attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids)
        return self._forward(input_ids, pixel_values, text_arguments, return_loss=return_loss,
                             interpolate_pos_encoding=interpolate_pos_encoding,
                             output_hidden_states=output_hidden_states)
