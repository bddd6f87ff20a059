"""The CLIP contrastive head, shared by ``CLIPModel`` and ``AltCLIPModel``.

Both references project each tower's pooled output with a bias-free Linear, L2-normalise the
projections (no epsilon), score every text-image pair by cosine similarity times
``exp(logit_scale)`` (no clamp) and train with the plain symmetric cross-entropy (no label
smoothing). ALIGN's head differs (no image projection, ``1 / temperature``, label smoothing) and
lives in ``altjax.models.align``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from altjax import losses
from altjax.models import layers
from altjax.models.outputs import DualEncoderOutput, TowerOutput


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
