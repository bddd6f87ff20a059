"""AltCLIP: a CLIP ViT image tower and an XLM-R text tower trained with a contrastive loss.

Port of transformers' ``AltCLIPModel``. The image embedding is ``visual_projection`` (no bias) of
the vision tower's pooled output (``post_layernorm`` of the CLS token); the text embedding is
``text_projection`` (no bias) of the text tower's pooled output (token 0 of
``transformation(pre_LN(h))``). Logits are cosine similarities times ``exp(logit_scale)`` (no clamp)
and the loss is the plain symmetric cross-entropy.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.models import heads, inputs, layers
from altjax.models.configuration import config_to_hf, dual_encoder_config_from_hf
from altjax.models.outputs import DualEncoderOutput
from altjax.models.vit import CLIPVision, CLIPVisionConfig
from altjax.models.xlm_roberta import AltCLIPText, XLMRobertaConfig

MODEL_TYPE = "altclip"
TEXT_MODEL_TYPE = "altclip_text_model"
VISION_MODEL_TYPE = "altclip_vision_model"


@dataclasses.dataclass(frozen=True)
class AltCLIPConfig:
    """HF ``AltCLIPConfig``: the two tower configs, projection width and initial logit scale.

    The class defaults are transformers' (ViT-B/32 vision, XLM-R large text); the released AltCLIP
    is the ``"altclip"`` preset (ViT-L/14).
    """

    text_config: XLMRobertaConfig = dataclasses.field(default_factory=XLMRobertaConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "AltCLIPConfig":
        """From an HF ``AltCLIPConfig`` dict (``config.json``); other keys go to ``extra``.

        Legacy ``text_config_dict`` / ``vision_config_dict`` are merged as transformers does: every
        tower field then comes from the legacy dict (or its default), other keys of
        ``text_config`` / ``vision_config`` are kept.
        """
        return dual_encoder_config_from_hf(cls, d, model_type=MODEL_TYPE, text_cls=XLMRobertaConfig,
                                           vision_cls=CLIPVisionConfig, what="an AltCLIP")

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict; ``from_hf(d).to_hf() == d`` for a dict written by transformers."""
        d = config_to_hf(self)
        # Configs built in Python (presets) have no model_type in ``extra``; transformers needs it.
        d.setdefault("model_type", MODEL_TYPE)
        d["text_config"].setdefault("model_type", TEXT_MODEL_TYPE)
        d["vision_config"].setdefault("model_type", VISION_MODEL_TYPE)
        return d

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


class AltCLIPModel(nnx.Module):
    """AltCLIP dual encoder with the attribute names of transformers' ``AltCLIPModel``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32,
    and normalisation, logits and loss are computed in float32. Built in eval mode; ``train()``
    turns dropout on.
    """

    def __init__(self, config: AltCLIPConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        # The directory from_pretrained read, whose processor files save_pretrained copies along.
        self.name_or_path: Optional[str] = None
        self.text_model = AltCLIPText(config.text_config, dtype=dtype, rngs=rngs)
        self.vision_model = CLIPVision(config.vision_config, dtype=dtype, rngs=rngs)
        factor = config.initializer_factor
        self.visual_projection = heads.projection(
            config.vision_config.hidden_size, config.projection_dim, factor, dtype=dtype, rngs=rngs
        )
        self.text_projection = heads.projection(
            config.text_config.project_dim, config.projection_dim, factor, dtype=dtype, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, dtype=jnp.float32))

    def _check_text(self, input_ids, attention_mask, token_type_ids, position_ids):
        inputs.check_text(type(self).__name__, self.config.text_config, input_ids, attention_mask, token_type_ids,
                          position_ids, roberta_positions=True)

    def _check_pixels(self, pixel_values, interpolate_pos_encoding):
        vision = self.config.vision_config
        inputs.check_pixels(type(self).__name__, pixel_values, vision.num_channels, nchw=True,
                            image_size=None if interpolate_pos_encoding else vision.image_size)

    def _text(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states=False):
        out = self.text_model.forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )
        return out, self.text_projection(out.pooler_output)

    def _vision(self, pixel_values, interpolate_pos_encoding=False, output_hidden_states=False):
        out = self.vision_model.forward(
            layers.to_nhwc(pixel_values, self.config.vision_config.num_channels),
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
        )
        return out, self.visual_projection(out.pooler_output)

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
        self._check_text(input_ids, attention_mask, token_type_ids, position_ids)
        return self._text(input_ids, attention_mask, token_type_ids, position_ids)[1]

    def get_image_features(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """Unnormalised image features ``visual_projection(post_layernorm(CLS))``, shape (B, projection_dim).

        ``pixel_values`` are NHWC (B, H, W, 3); NCHW (B, 3, H, W) is also accepted (see ``__call__``).
        Unlike transformers, which returns the vision model's output object, this returns the array.
        """
        self._check_pixels(pixel_values, interpolate_pos_encoding)
        return self._vision(pixel_values, interpolate_pos_encoding)[1]

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
        inputs.check_pairs(type(self).__name__, input_ids, pixel_values, return_loss)
        self._check_pixels(pixel_values, interpolate_pos_encoding)
        self._check_text(input_ids, attention_mask, token_type_ids, position_ids)
        vision_out, image_features = self._vision(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text_out, text_features = self._text(
            input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states
        )
        return heads.contrastive_output(
            image_features,
            text_features,
            self.logit_scale[...],
            vision_model_output=vision_out,
            text_model_output=text_out,
            return_loss=return_loss,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, seed: int = 0, mesh=None,
                        rules=None, progress: bool = False) -> "AltCLIPModel":
        """Loads an AltCLIP directory: HF (``config.json`` + safetensors, sharded safetensors or
        ``pytorch_model.bin``) or altjax (``save_pretrained``). torch is needed only for ``.bin``.

        ``dtype`` is the compute dtype (parameters stay float32); ``seed`` seeds the dropout streams.
        With a ``mesh`` each parameter is placed directly in its ``altjax.sharding`` layout (``rules``
        default to ``sharding.PARTITION_RULES``), with no full replica on any device.
        Both HF key spellings load: the Hub's (text ``encoder.layer.{i}``, vision
        ``encoder.layers.{i}``) and transformers 5's (``layer.`` for both).
        Raises ``CheckpointError`` when the directory is not an AltCLIP model and ``ConversionError``
        naming every missing, unexpected or misshapen tensor.
        """
        from altjax import checkpoint
        from altjax.conversion.altclip import altclip_table

        def build(d: dict[str, Any]):
            config = AltCLIPConfig.from_hf(d)
            return config, lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(seed))

        return checkpoint.load_model(path, model_type=MODEL_TYPE, build=build, table=altclip_table, seed=seed,
                                     mesh=mesh, rules=rules, progress=progress)

    def save_pretrained(self, path: str | os.PathLike, *, format: str = "altjax", max_shard_size="50GB",
                        overwrite: bool = False, progress: bool = False) -> str:
        """Writes an altjax (orbax) or, with ``format="hf"``, a transformers ``AltCLIPModel`` directory,
        atomically; see ``altjax.checkpoint.save_model``."""
        from altjax import checkpoint
        from altjax.conversion.altclip import altclip_table

        return checkpoint.save_model(self, path, format=format, table=altclip_table, max_shard_size=max_shard_size,
                                     overwrite=overwrite, progress=progress)
