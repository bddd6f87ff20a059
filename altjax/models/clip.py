"""CLIP: a ViT image tower and a causal text transformer trained with a contrastive loss.

Port of transformers' ``CLIPModel``. The image embedding is ``visual_projection`` (no bias) of the
vision tower's pooled output (``post_layernorm`` of the CLS token); the text embedding is
``text_projection`` (no bias) of the text tower's pooled output (``final_layer_norm`` at the
end-of-text token). The head is AltCLIP's (``altjax.models.heads``): cosine logits times
``exp(logit_scale)`` without clamp, plain symmetric cross-entropy.

In altjax CLIP is AltCLIP's distillation teacher: ``CLIPModel.text_teacher()`` is the text tower and
``text_projection`` as a ``CLIPTextTeacher``, sharing this model's parameters.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from altjax.models import heads, inputs, layers
from altjax.models.clip_text import CLIPText, CLIPTextConfig, CLIPTextTeacher
from altjax.models.configuration import config_to_hf, dual_encoder_config_from_hf
from altjax.models.outputs import DualEncoderOutput
from altjax.models.vit import CLIPVision, CLIPVisionConfig

MODEL_TYPE = "clip"
TEXT_MODEL_TYPE = "clip_text_model"
VISION_MODEL_TYPE = "clip_vision_model"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """HF ``CLIPConfig``: the two tower configs, projection width and initial logit scale.

    The class defaults are transformers' (openai/clip-vit-base-patch32's architecture). The width
    of both projections is the top-level ``projection_dim``; the towers' own ``projection_dim``
    keys are not used by ``CLIPModel``.
    """

    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    # Left out of the hash so that the config (a static attribute of the module) stays hashable.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "CLIPConfig":
        """From an HF ``CLIPConfig`` dict (``config.json``); other keys go to ``extra``.

        Legacy ``text_config_dict`` / ``vision_config_dict`` are merged as transformers does: every
        tower field then comes from the legacy dict (or its default), other keys of
        ``text_config`` / ``vision_config`` are kept.
        """
        return dual_encoder_config_from_hf(cls, d, model_type=MODEL_TYPE, text_cls=CLIPTextConfig,
                                           vision_cls=CLIPVisionConfig, what="a CLIP")

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict; ``from_hf(d).to_hf() == d`` for a dict written by transformers."""
        d = config_to_hf(self)
        # Configs built in Python (presets) have no model_type in ``extra``; transformers needs it.
        d.setdefault("model_type", MODEL_TYPE)
        d["text_config"].setdefault("model_type", TEXT_MODEL_TYPE)
        d["vision_config"].setdefault("model_type", VISION_MODEL_TYPE)
        return d

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


class CLIPModel(nnx.Module):
    """CLIP dual encoder with the attribute names of transformers' ``CLIPModel``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32,
    and normalisation, logits and loss are computed in float32. Built in eval mode; ``train()``
    turns attention dropout on (zero in every released CLIP config).
    """

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        # The directory from_pretrained read, whose processor files save_pretrained copies along.
        self.name_or_path: Optional[str] = None
        self.text_model = CLIPText(config.text_config, dtype=dtype, rngs=rngs)
        self.vision_model = CLIPVision(config.vision_config, dtype=dtype, rngs=rngs)
        factor = config.initializer_factor
        self.visual_projection = heads.projection(
            config.vision_config.hidden_size, config.projection_dim, factor, dtype=dtype, rngs=rngs
        )
        self.text_projection = heads.projection(
            config.text_config.hidden_size, config.projection_dim, factor, dtype=dtype, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, dtype=jnp.float32))

    def _check_text(self, input_ids, attention_mask, position_ids):
        inputs.check_text(type(self).__name__, self.config.text_config, input_ids, attention_mask, None, position_ids)

    def _check_pixels(self, pixel_values, interpolate_pos_encoding):
        vision = self.config.vision_config
        inputs.check_pixels(type(self).__name__, pixel_values, vision.num_channels, nchw=True,
                            image_size=None if interpolate_pos_encoding else vision.image_size)

    def _text(self, input_ids, attention_mask, position_ids, output_hidden_states=False):
        out = self.text_model.forward(
            input_ids,
            attention_mask=attention_mask,
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
        position_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Unnormalised text features ``text_projection(pooler_output)``, shape (B, projection_dim).

        The pooled token is the end-of-text token (``altjax.models.clip_text.eos_positions``).
        Unlike transformers, which returns the text model's output object with these features in
        ``pooler_output``, this returns the array itself. The argument order is transformers'
        (``position_ids`` third; CLIP has no token types).
        """
        self._check_text(input_ids, attention_mask, position_ids)
        return self._text(input_ids, attention_mask, position_ids)[1]

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
        inputs.check_pairs(type(self).__name__, input_ids, pixel_values, return_loss)
        self._check_pixels(pixel_values, interpolate_pos_encoding)
        self._check_text(input_ids, attention_mask, position_ids)
        vision_out, image_features = self._vision(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text_out, text_features = self._text(input_ids, attention_mask, position_ids, output_hidden_states)
        # transformers 5's CLIPModel.forward reuses get_*_features' outputs, whose pooler_output is
        # the projected features (AltCLIPModel keeps the towers' own).
        return heads.contrastive_output(
            image_features,
            text_features,
            self.logit_scale[...],
            vision_model_output=vision_out.replace(pooler_output=image_features),
            text_model_output=text_out.replace(pooler_output=text_features),
            return_loss=return_loss,
        )

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

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, seed: int = 0, mesh=None,
                        rules=None, progress: bool = False) -> "CLIPModel":
        """Loads a CLIP directory: HF (``config.json`` + safetensors, sharded safetensors or
        ``pytorch_model.bin``) or altjax (``save_pretrained``). torch is needed only for ``.bin``.

        ``dtype`` is the compute dtype (parameters stay float32); ``seed`` seeds the dropout streams.
        With a ``mesh`` each parameter is placed directly in its ``altjax.sharding`` layout (``rules``
        default to ``sharding.PARTITION_RULES``), with no full replica on any device. Stale
        ``position_ids`` buffers of older checkpoints are ignored.
        Raises ``CheckpointError`` when the directory is not a CLIP model and ``ConversionError``
        naming every missing, unexpected or misshapen tensor.
        """
        from altjax import checkpoint
        from altjax.conversion.clip import clip_table

        def build(d: dict[str, Any]):
            config = CLIPConfig.from_hf(d)
            return config, lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(seed))

        return checkpoint.load_model(path, model_type=MODEL_TYPE, build=build, table=clip_table, seed=seed,
                                     mesh=mesh, rules=rules, progress=progress)

    def save_pretrained(self, path: str | os.PathLike, *, format: str = "altjax", max_shard_size="50GB",
                        overwrite: bool = False, progress: bool = False) -> str:
        """Writes an altjax (orbax) or, with ``format="hf"``, a transformers ``CLIPModel`` directory,
        atomically; see ``altjax.checkpoint.save_model``."""
        from altjax import checkpoint
        from altjax.conversion.clip import clip_table

        return checkpoint.save_model(self, path, format=format, table=clip_table, max_shard_size=max_shard_size,
                                     overwrite=overwrite, progress=progress)
