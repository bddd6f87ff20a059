"""CLIP: a ViT image tower and a causal text transformer trained with a contrastive loss.

Port of transformers' ``CLIPModel``. The image embedding is ``visual_projection`` (no bias) of the
vision tower's pooled output (``post_layernorm`` of the CLS token); the text embedding is
``text_projection`` (no bias) of the text tower's pooled output (``final_layer_norm`` at the
end-of-text token). Everything but the text tower is AltCLIP's (``altjax.models.dual_encoder``):
cosine logits times ``exp(logit_scale)`` without clamp, plain symmetric cross-entropy.

In altjax CLIP is AltCLIP's distillation teacher: ``CLIPModel.text_teacher()`` is the text tower and
``text_projection`` as a ``CLIPTextTeacher``, sharing this model's parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from flax import nnx

from altjax.model_io.engine import Row, Table, linear_rows, prefixed
from altjax.models import clip_text, vit
from altjax.models.clip_text import CLIPText, CLIPTextConfig, CLIPTextTeacher
from altjax.models.dual_encoder import DualEncoder, DualEncoderConfig
from altjax.models.outputs import DualEncoderOutput, TowerOutput
from altjax.models.vit import CLIPVisionConfig

MODEL_TYPE = "clip"


@dataclasses.dataclass(frozen=True)
class CLIPConfig(DualEncoderConfig):
    """HF ``CLIPConfig``: the two tower configs, projection width and initial logit scale.

    The class defaults are transformers' (openai/clip-vit-base-patch32's architecture). The width
    of both projections is the top-level ``projection_dim``; the towers' own ``projection_dim``
    keys are not used by ``CLIPModel``.
    """

    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 512

    model_type = MODEL_TYPE
    text_model_type = clip_text.MODEL_TYPE
    vision_model_type = vit.MODEL_TYPE
    text_config_class = CLIPTextConfig
    described_as = "a CLIP"

    @classmethod
    def from_preset(cls, name: str) -> "CLIPConfig":
        """A named configuration: ``"clip-vit-b32"``, ``"clip-vit-l14"`` or ``"clip-tiny"`` (see ``PRESETS``)."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}") from None


def _clip_vit_b32() -> CLIPConfig:
    # openai/clip-vit-base-patch32 = transformers' class defaults: ViT-B/32 at 224 px, a 512-wide text
    # transformer, 512-wide projections.
    return CLIPConfig()


def _clip_vit_l14() -> CLIPConfig:
    # openai/clip-vit-large-patch14: ViT-L/14 at 224 px, a 768-wide text transformer (AltCLIP's
    # teacher: its width is AltCLIP's project_dim), 768-wide projections.
    return CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768),
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=768,
        ),
        projection_dim=768,
    )


def _clip_tiny() -> CLIPConfig:
    # Trainable from scratch on a CPU in minutes: 64 px images in 8 px patches (64 patches), three
    # 64-wide layers per tower, captions of at most 32 tokens. The 1024-id vocabulary holds a small
    # word-level tokenizer laid out like CLIP's: words first, then start- and end-of-text as the
    # last two ids (the end token also pads, as CLIP's tokenizer does; pooling takes its first
    # occurrence).
    return CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=32, projection_dim=64, pad_token_id=1023, bos_token_id=1022, eos_token_id=1023,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=64,
            patch_size=8, projection_dim=64,
        ),
        projection_dim=64,
    )


PRESETS = {"clip-vit-b32": _clip_vit_b32, "clip-vit-l14": _clip_vit_l14, "clip-tiny": _clip_tiny}


# --- transformers' state dict (``CLIPModel``) -----------------------------------------------------
# transformers has no key renames for CLIP, so its files hold the state-dict spelling.

HEAD = [*linear_rows("visual_projection", bias=False), *linear_rows("text_projection", bias=False),
        Row("logit_scale", "logit_scale")]


def clip_table(config: CLIPConfig) -> Table:
    """Every tensor of ``CLIPModel``: the text tower under ``text_model.``, the vision tower under
    ``vision_model.``, both projections and the logit scale. Stale ``position_ids`` buffers of
    either tower are ignored on import."""
    rows = (
        prefixed(clip_text.clip_text_rows(config.text_config), "text_model.", "text_model.")
        + prefixed(vit.clip_vision_rows(config.vision_config), "vision_model.", "vision_model.")
        + HEAD
    )
    ignore = tuple(rf"^text_model\.{p}" for p in clip_text.IGNORED_BUFFERS)
    ignore += tuple(rf"^vision_model\.{p}" for p in vit.IGNORED_BUFFERS)
    return Table(rows=tuple(rows), ignore=ignore)


class CLIPModel(DualEncoder):
    """CLIP dual encoder with the attribute names of transformers' ``CLIPModel``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32,
    and normalisation, logits and loss are computed in float32. Built in eval mode; ``train()``
    turns attention dropout on (zero in every released CLIP config).
    """

    model_type = MODEL_TYPE
    config_class = CLIPConfig
    conversion_table = staticmethod(clip_table)
    text_tower = CLIPText

    def get_text_features(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Unnormalised text features ``text_projection(pooler_output)``, shape (B, projection_dim).

        The pooled token is the end-of-text token (``altjax.models.clip_text.eos_positions``).
        Unlike transformers, which returns the text model's output object with these features in
        ``pooler_output``, this returns the array itself. The argument order is transformers'
        (``position_ids`` third; CLIP has no token types).
        """
        self._check_text(input_ids, attention_mask, position_ids)
        return self._text(input_ids, attention_mask=attention_mask, position_ids=position_ids)[1]

    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        pixel_values: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
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
        Texts are causal: with right padding ``attention_mask`` changes nothing the pooled token sees.

        Returns ``text_embeds`` and ``image_embeds`` (L2-normalised), ``logits_per_text`` =
        ``text_embeds @ image_embeds.T * exp(logit_scale)`` and ``logits_per_image``, its
        transpose; with ``return_loss``, the symmetric cross-entropy (texts and images paired by
        index). ``text_model_output.last_hidden_state`` is (B, L, D) after ``final_layer_norm``;
        ``vision_model_output.last_hidden_state`` is (B, N+1, D), not post-normed. As in
        transformers 5, both towers' ``pooler_output`` are the unnormalised projected features
        (``get_text_features`` / ``get_image_features``), not the towers' pooled states.
        """
        return self._forward(input_ids, pixel_values, dict(attention_mask=attention_mask, position_ids=position_ids),
                             return_loss=return_loss, interpolate_pos_encoding=interpolate_pos_encoding,
                             output_hidden_states=output_hidden_states)

    def _tower_outputs(self, vision_out: TowerOutput, image_features, text_out: TowerOutput, text_features):
        # transformers 5's CLIPModel.forward reuses get_*_features' outputs, whose pooler_output is
        # the projected features (AltCLIPModel keeps the towers' own).
        return vision_out.replace(pooler_output=image_features), text_out.replace(pooler_output=text_features)

    def text_teacher(self) -> CLIPTextTeacher:
        """The text tower and ``text_projection`` as a ``CLIPTextTeacher`` (AltCLIP's distillation
        teacher), sharing this model's modules and parameters: nothing is copied, an update to one
        is seen by the other, and ``train()`` / ``eval()`` on either switches both.

        Its ``config`` is ``text_config`` with the top-level ``projection_dim``, as
        ``CLIPTextTeacher.from_pretrained`` reads a ``CLIPModel`` checkpoint; the compute dtype is
        this model's.
        """
        config = dataclasses.replace(self.config.text_config, projection_dim=self.config.projection_dim)
        # An abstract shell whose two submodules are then replaced by this model's own.
        teacher = nnx.eval_shape(lambda: CLIPTextTeacher(config, rngs=nnx.Rngs(0)))
        teacher.text_model = self.text_model
        teacher.text_projection = self.text_projection
        return teacher
