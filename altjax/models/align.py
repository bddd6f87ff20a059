"""ALIGN: an EfficientNet image tower and a BERT text tower trained with a contrastive loss.

Port of transformers' ``AlignModel``. The image embedding is the vision tower's pooled output
itself (global mean of the last block, no projection, no top conv); the text embedding is
``text_projection`` applied to the raw [CLS] hidden state (not the tanh pooler). Logits are cosine
similarities divided by a learned ``temperature`` (no exp, no clamp), and the loss is the symmetric
cross-entropy with label smoothing 0.1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax import losses
from altjax.model_io.engine import Row, Table, linear_rows, prefixed
from altjax.model_io.pretrained import PretrainedModel
from altjax.models import bert, efficientnet, inputs, layers
from altjax.models.bert import Bert, BertConfig
from altjax.models.configuration import config_from_hf, config_to_hf
from altjax.models.efficientnet import EfficientNet, EfficientNetConfig, round_filters
from altjax.models.outputs import DualEncoderOutput, TowerOutput

MODEL_TYPE = "align"
TEXT_MODEL_TYPE = "align_text_model"
VISION_MODEL_TYPE = "align_vision_model"
# ALIGN's loss: cross-entropy with PyTorch label smoothing 0.1 in both directions.
LABEL_SMOOTHING = 0.1


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """HF ``AlignConfig``: the two tower configs, projection width and initial temperature.

    ``projection_dim`` must equal the vision tower's output channels (640 for align-base): there is
    no vision projection, so the image embedding is the pooled 640-channel feature itself.
    """

    text_config: BertConfig = dataclasses.field(default_factory=BertConfig)
    vision_config: EfficientNetConfig = dataclasses.field(default_factory=EfficientNetConfig)
    projection_dim: int = 640
    temperature_init_value: float = 1.0
    initializer_range: float = 0.02
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "AlignConfig":
        """From an HF ``AlignConfig`` dict (``config.json``); other keys go to ``extra``."""
        got = d.get("model_type")
        if got != MODEL_TYPE:
            raise ValueError(f"not an ALIGN config: model_type is {got!r}, expected {MODEL_TYPE!r}")
        return config_from_hf(
            cls,
            d,
            text_config=BertConfig.from_hf(d.get("text_config") or {}),
            vision_config=EfficientNetConfig.from_hf(d.get("vision_config") or {}),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict; ``from_hf(d).to_hf() == d`` for a dict written by transformers."""
        # The towers write their own dicts: the vision config adds its derived num_hidden_layers.
        d = config_to_hf(self) | {"text_config": self.text_config.to_hf(), "vision_config": self.vision_config.to_hf()}
        # Configs built in Python (presets) have no model_type in ``extra``; transformers needs it.
        d.setdefault("model_type", MODEL_TYPE)
        d["text_config"].setdefault("model_type", TEXT_MODEL_TYPE)
        d["vision_config"].setdefault("model_type", VISION_MODEL_TYPE)
        return d

    @classmethod
    def from_preset(cls, name: str) -> "AlignConfig":
        """A named configuration: ``"align-base"`` or ``"align-tiny"`` (see ``PRESETS``)."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown ALIGN preset {name!r}; known: {sorted(PRESETS)}") from None


def _align_base() -> AlignConfig:
    # kakaobrain/align-base: EfficientNet-B7 as converted from the TF checkpoint (image_size 289,
    # hidden_dim 640, no depthwise_padding blocks) and a plain BERT-base.
    return AlignConfig(
        text_config=BertConfig(),
        vision_config=EfficientNetConfig(image_size=289, hidden_dim=640, depthwise_padding=()),
        projection_dim=640,
    )


def _align_tiny() -> AlignConfig:
    # Three small stages (one stride-1, two stride-2, k3 and k5) at width/depth 1.0, and a 2-layer
    # BERT of width 32 with BERT's vocabulary and positions so that the real tokenizer can feed it.
    return AlignConfig(
        text_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        vision_config=EfficientNetConfig(
            image_size=33,
            width_coefficient=1.0,
            depth_coefficient=1.0,
            kernel_sizes=(3, 3, 5),
            in_channels=(32, 16, 24),
            out_channels=(16, 24, 40),
            strides=(1, 2, 2),
            num_block_repeats=(1, 2, 1),
            expand_ratios=(1, 6, 6),
            hidden_dim=40,
        ),
        projection_dim=40,
    )


PRESETS = {"align-base": _align_base, "align-tiny": _align_tiny}


# --- transformers' state dict (``AlignModel``) ----------------------------------------------------
# ALIGN's on-disk key names equal its ``state_dict()`` names, so the table needs no disk renames.

HEAD = [*linear_rows("text_projection"), Row("temperature", "temperature")]


def align_table(config: AlignConfig) -> Table:
    """Every tensor of ``AlignModel``: the text tower under ``text_model.``, the vision tower under
    ``vision_model.``, the text projection and the temperature."""
    rows = (
        prefixed(bert.bert_rows(config.text_config), "text_model.", "text_model.")
        + prefixed(efficientnet.efficientnet_rows(config.vision_config), "vision_model.", "vision_model.")
        + HEAD
    )
    # Older checkpoints still contain the text embeddings' non-persistent id buffers.
    return Table(rows=tuple(rows), ignore=tuple(r"^text_model\." + p for p in bert.IGNORED_BUFFERS))


class AlignModel(PretrainedModel, nnx.Module):
    """ALIGN dual encoder with the attribute names of transformers' ``AlignModel``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32,
    and normalisation, logits and loss are computed in float32. Built in eval mode; ``train()``
    turns on dropout and BatchNorm batch statistics.
    """

    model_type = MODEL_TYPE
    config_class = AlignConfig
    conversion_table = staticmethod(align_table)

    def __init__(self, config: AlignConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        vision = config.vision_config
        image_dim = round_filters(vision, vision.out_channels[-1])
        if config.projection_dim != image_dim:
            # transformers builds such a model and fails in the first forward's matmul.
            raise ValueError(
                f"projection_dim {config.projection_dim} must equal the vision tower's output channels "
                f"{image_dim}: ALIGN has no image projection"
            )
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.text_model = Bert(config.text_config, dtype=dtype, rngs=rngs)
        self.vision_model = EfficientNet(config.vision_config, dtype=dtype, rngs=rngs)
        # transformers initialises this projection with xavier_uniform and a zero bias.
        self.text_projection = nnx.Linear(
            config.text_config.hidden_size,
            config.projection_dim,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.xavier_uniform(),
            bias_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.temperature = nnx.Param(jnp.asarray(config.temperature_init_value, dtype=jnp.float32))

    def _check_text(self, input_ids, attention_mask, token_type_ids, position_ids):
        inputs.check_text(type(self).__name__, self.config.text_config, input_ids, attention_mask, token_type_ids,
                          position_ids)

    def _check_pixels(self, pixel_values):
        inputs.check_pixels(type(self).__name__, pixel_values, self.config.vision_config.num_channels, nchw=True)

    def _text(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states=False):
        out = self.text_model.forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )
        return out, self.text_projection(out.last_hidden_state[:, 0, :]).astype(jnp.float32)

    def _vision(self, pixel_values, output_hidden_states=False) -> TowerOutput:
        return self.vision_model.forward(
            layers.to_nhwc(pixel_values, self.config.vision_config.num_channels), output_hidden_states=output_hidden_states
        )

    def get_text_features(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Unnormalised text features ``text_projection(h[:, 0])``, float32 (B, projection_dim).

        Unlike transformers, which returns the text model's output object with these features in
        ``pooler_output``, this returns the array itself.
        """
        self._check_text(input_ids, attention_mask, token_type_ids, position_ids)
        return self._text(input_ids, attention_mask, token_type_ids, position_ids)[1]

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Unnormalised image features (the vision tower's pooled output), float32 (B, projection_dim).

        ``pixel_values`` are NHWC (B, H, W, 3); NCHW (B, 3, H, W) is also accepted (see ``__call__``).
        Unlike transformers, which returns the vision model's output object, this returns the array.
        """
        self._check_pixels(pixel_values)
        return self._vision(pixel_values).pooler_output

    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        pixel_values: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        return_loss: bool = False,
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
        its second is. ``vision_model_output.last_hidden_state`` is NHWC.

        Returns ``text_embeds`` and ``image_embeds`` (L2-normalised), ``logits_per_text`` =
        ``text_embeds @ image_embeds.T / temperature`` and ``logits_per_image``, its transpose; with
        ``return_loss``, the ALIGN loss (texts and images paired by index).
        """
        inputs.check_pairs(type(self).__name__, input_ids, pixel_values, return_loss)
        self._check_pixels(pixel_values)
        self._check_text(input_ids, attention_mask, token_type_ids, position_ids)
        vision_out = self._vision(pixel_values, output_hidden_states)
        text_out, text_features = self._text(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        image_embeds = layers.l2_normalize(vision_out.pooler_output.astype(jnp.float32))
        text_embeds = layers.l2_normalize(text_features)
        temperature = self.temperature[...]
        logits_per_text = (text_embeds @ image_embeds.T) / temperature
        loss = None
        if return_loss:
            loss = losses.contrastive_loss(
                image_embeds, text_embeds, kind="softmax", logit_scale=1.0 / temperature, label_smoothing=LABEL_SMOOTHING
            )
        return DualEncoderOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_out,
            vision_model_output=vision_out,
            loss=loss,
        )
