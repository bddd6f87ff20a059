"""The dual encoder shared by CLIP and AltCLIP: a text tower and a CLIP ViT, each followed by a
bias-free projection, scored by cosine similarity times ``exp(logit_scale)``.

Both references project each tower's pooled output with a bias-free Linear, L2-normalise the
projections (no epsilon), score every text-image pair by cosine similarity times
``exp(logit_scale)`` (no clamp) and train with the plain symmetric cross-entropy (no label
smoothing). ``CLIPModel`` and ``AltCLIPModel`` differ only in their text tower (and its
arguments) and in what their output's ``pooler_output`` holds. ALIGN's head differs (no image
projection, ``1 / temperature``, label smoothing) and lives in ``altjax.models.align``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax import losses
from altjax.model_io.pretrained import PretrainedModel
from altjax.models import inputs, layers
from altjax.models.configuration import config_from_hf, config_to_hf
from altjax.models.outputs import DualEncoderOutput, TowerOutput
from altjax.models.vit import CLIPVision, CLIPVisionConfig


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """HF ``CLIPConfig`` / ``AltCLIPConfig``: the two tower configs, projection width and initial
    logit scale. A subclass sets the text config's default and the class-level names below."""

    text_config: Any
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    model_type: ClassVar[str]
    text_model_type: ClassVar[str]
    vision_model_type: ClassVar[str]
    text_config_class: ClassVar[type]
    # The model's name with its article, for the error on another model_type ("a CLIP").
    described_as: ClassVar[str]

    @classmethod
    def from_hf(cls, d: dict[str, Any]):
        """From an HF config dict (``config.json``); other keys go to ``extra``.

        Legacy ``text_config_dict`` / ``vision_config_dict`` are merged as transformers does: every
        tower field then comes from the legacy dict (or its default), other keys of
        ``text_config`` / ``vision_config`` are kept.
        """
        got = d.get("model_type")
        if got != cls.model_type:
            raise ValueError(f"not {cls.described_as} config: model_type is {got!r}, expected {cls.model_type!r}")
        d = dict(d)
        text = dict(d.get("text_config") or {})
        vision = dict(d.get("vision_config") or {})
        if (legacy := d.pop("text_config_dict", None)) is not None:
            text.update(config_to_hf(cls.text_config_class.from_hf(legacy)))
        if (legacy := d.pop("vision_config_dict", None)) is not None:
            vision.update(config_to_hf(CLIPVisionConfig.from_hf(legacy)))
        return config_from_hf(cls, d, text_config=cls.text_config_class.from_hf(text),
                              vision_config=CLIPVisionConfig.from_hf(vision))

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict; ``from_hf(d).to_hf() == d`` for a dict written by transformers."""
        d = config_to_hf(self)
        # Configs built in Python (presets) have no model_type in ``extra``; transformers needs it.
        d.setdefault("model_type", self.model_type)
        d["text_config"].setdefault("model_type", self.text_model_type)
        d["vision_config"].setdefault("model_type", self.vision_model_type)
        return d


def projection(din: int, dout: int, initializer_factor: float, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """A projection Linear(din -> dout) without bias, float32 parameters, compute in ``dtype``.

    transformers initialises both CLIP projections N(0, din^-0.5 * initializer_factor).
    """
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(din**-0.5 * initializer_factor),
        rngs=rngs,
    )


def contrastive_output(
    image_features: jax.Array,
    text_features: jax.Array,
    logit_scale: jax.Array,
    *,
    vision_model_output: TowerOutput,
    text_model_output: TowerOutput,
    return_loss: bool,
) -> DualEncoderOutput:
    """The dual encoder's output from the unnormalised projected features (B_img, D) and (B_text, D).

    Normalisation, logits and loss are computed in float32 whatever the compute dtype.
    ``logits_per_text = text_embeds @ image_embeds.T * exp(logit_scale)``; with ``return_loss``,
    the symmetric cross-entropy with texts and images paired by index.
    """
    image_embeds = layers.l2_normalize(image_features.astype(jnp.float32))
    text_embeds = layers.l2_normalize(text_features.astype(jnp.float32))
    scale = jnp.exp(logit_scale)
    logits_per_text = (text_embeds @ image_embeds.T) * scale
    loss = None
    if return_loss:
        loss = losses.contrastive_loss(
            image_embeds, text_embeds, kind="softmax", logit_scale=scale, label_smoothing=0.0
        )
    return DualEncoderOutput(
        logits_per_image=logits_per_text.T,
        logits_per_text=logits_per_text,
        text_embeds=text_embeds,
        image_embeds=image_embeds,
        text_model_output=text_model_output,
        vision_model_output=vision_model_output,
        loss=loss,
    )


class DualEncoder(PretrainedModel, nnx.Module):
    """A text tower and a CLIP ViT image tower (``vision_model``), ``text_projection`` and
    ``visual_projection`` (no bias) and ``logit_scale``, with the attribute names of transformers'
    ``CLIPModel`` / ``AltCLIPModel``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32,
    and normalisation, logits and loss are computed in float32. Built in eval mode; ``train()``
    turns dropout on. A subclass names its ``text_tower`` class and gives its public
    ``get_text_features`` / ``__call__`` signatures (the text arguments differ by tower).
    """

    text_tower: ClassVar[type]
    # Whether the text tower numbers positions as RoBERTa does (checked at the API boundary).
    roberta_positions: ClassVar[bool] = False

    @staticmethod
    def text_features_dim(text_config: Any) -> int:
        """The width of the text tower's pooled output, the input of ``text_projection``."""
        return text_config.hidden_size

    def __init__(self, config: DualEncoderConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.text_model = self.text_tower(config.text_config, dtype=dtype, rngs=rngs)
        self.vision_model = CLIPVision(config.vision_config, dtype=dtype, rngs=rngs)
        factor = config.initializer_factor
        self.visual_projection = projection(
            config.vision_config.hidden_size, config.projection_dim, factor, dtype=dtype, rngs=rngs
        )
        self.text_projection = projection(
            self.text_features_dim(config.text_config), config.projection_dim, factor, dtype=dtype, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, dtype=jnp.float32))

    def _check_text(self, input_ids, attention_mask, position_ids, token_type_ids=None):
        inputs.check_text(type(self).__name__, self.config.text_config, input_ids, attention_mask, token_type_ids,
                          position_ids, roberta_positions=self.roberta_positions)

    def _check_pixels(self, pixel_values, interpolate_pos_encoding):
        vision = self.config.vision_config
        inputs.check_pixels(type(self).__name__, pixel_values, vision.num_channels, nchw=True,
                            image_size=None if interpolate_pos_encoding else vision.image_size)

    def _text(self, input_ids, output_hidden_states=False, **text_arguments):
        out = self.text_model.forward(input_ids, output_hidden_states=output_hidden_states, **text_arguments)
        return out, self.text_projection(out.pooler_output)

    def _vision(self, pixel_values, interpolate_pos_encoding=False, output_hidden_states=False):
        out = self.vision_model.forward(
            layers.to_nhwc(pixel_values, self.config.vision_config.num_channels),
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
        )
        return out, self.visual_projection(out.pooler_output)

    def get_image_features(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """Unnormalised image features ``visual_projection(post_layernorm(CLS))``, shape (B, projection_dim).

        ``pixel_values`` are NHWC (B, H, W, 3); NCHW (B, 3, H, W) is also accepted (see ``__call__``).
        Unlike transformers, which returns the vision model's output object, this returns the array.
        """
        self._check_pixels(pixel_values, interpolate_pos_encoding)
        return self._vision(pixel_values, interpolate_pos_encoding)[1]

    def _tower_outputs(self, vision_out: TowerOutput, image_features, text_out: TowerOutput, text_features):
        """The towers' outputs as the reference's output object holds them."""
        return vision_out, text_out

    def _forward(self, input_ids, pixel_values, text_arguments: dict[str, Any], *, return_loss: bool,
                 interpolate_pos_encoding: bool, output_hidden_states: bool) -> DualEncoderOutput:
        inputs.check_pairs(type(self).__name__, input_ids, pixel_values, return_loss)
        self._check_pixels(pixel_values, interpolate_pos_encoding)
        self._check_text(input_ids, **text_arguments)
        vision_out, image_features = self._vision(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text_out, text_features = self._text(input_ids, output_hidden_states, **text_arguments)
        vision_out, text_out = self._tower_outputs(vision_out, image_features, text_out, text_features)
        return contrastive_output(
            image_features,
            text_features,
            self.logit_scale[...],
            vision_model_output=vision_out,
            text_model_output=text_out,
            return_loss=return_loss,
        )
