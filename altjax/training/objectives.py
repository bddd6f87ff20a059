"""What a training step minimises: an :class:`Objective`, and the two kinds altjax trains with.

``contrastive``  image-text contrastive learning (ALIGN, CLIP, AltCLIP phase 2; softmax or SigLIP's
                 sigmoid loss) on any dual encoder, given how to read its two towers and its scale.
``regression``   a student's embedding regressed onto a frozen teacher's (AltCLIP phase 1).

Rematerialisation is not theirs: the trainer sets it on every layer of the model
(``altjax.models.stack.set_remat``), so every task gets it the same way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from altjax import losses
from altjax.models import layers


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step minimises.

    ``features(model, batch)``: a pytree of per-example arrays, leading axis the batch.
    ``loss(model, features, mesh)``: ``(loss, metrics)`` for the whole batch's features; ``mesh``
    is the device mesh the features are split over (None: one device).
    ``chance(batch_size)``: the loss of a model that has learned nothing (a contrastive loss's
    value for uniform predictions), or None where no such level exists (a regression).
    ``logit_bias``: the initial value of a learnable logit bias the trainer attaches to the model
    for this objective (:func:`attach_logit_bias`), or None.
    """

    features: Callable[[nnx.Module, dict], Any]
    loss: Callable[[nnx.Module, Any, Optional[Mesh]], tuple[jax.Array, dict[str, jax.Array]]]
    chance: Optional[Callable[[int], float]] = None
    logit_bias: Optional[float] = None


def normalised(image, text) -> dict[str, jax.Array]:
    """The features a contrastive objective works on: both towers' embeddings, L2-normalised in fp32."""
    return {"image_embeds": layers.l2_normalize(image.astype(jnp.float32)),
            "text_embeds": layers.l2_normalize(text.astype(jnp.float32))}


def contrastive(image_features: Callable, text_features: Callable, logit_scale: Callable, *, kind: str,
                label_smoothing: float, learn_temperature: bool, learn_bias: bool, impl: str) -> Objective:
    """The symmetric contrastive loss of a dual encoder: ``image_features(model, batch)`` and
    ``text_features(model, batch)``, L2-normalised, with logits scaled by ``logit_scale(model)`` (ALIGN: ``1 / temperature``, CLIP:
    ``exp(logit_scale)``): :func:`altjax.losses.contrastive_loss`, sharded over the mesh with
    ``impl`` ("gather" or "ring"). ``kind="sigmoid"`` is SigLIP's loss, with the bias
    :func:`logit_bias` (learned from SigLIP's initial value when ``learn_bias``, else held there);
    label smoothing applies to the softmax loss only. ``learn_temperature=False`` holds the scale
    (no gradient reaches its parameter). Metrics: ``temperature`` (1 / scale) and, for the sigmoid
    loss, ``logit_bias``."""
    def features(model, batch):
        return normalised(image_features(model, batch), text_features(model, batch))

    def loss(model, feats, mesh):
        scale = logit_scale(model)
        if not learn_temperature:
            scale = jax.lax.stop_gradient(scale)
        bias = logit_bias(model) if kind == "sigmoid" else None
        value = losses.contrastive_loss(
            feats["image_embeds"], feats["text_embeds"], kind=kind, logit_scale=scale, logit_bias=bias,
            label_smoothing=label_smoothing if kind == "softmax" else 0.0, mesh=mesh, impl=impl)
        return value, {"temperature": 1.0 / scale, **({"logit_bias": bias} if kind == "sigmoid" else {})}

    learned = losses.SIGLIP_LOGIT_BIAS if kind == "sigmoid" and learn_bias else None
    return Objective(features, loss, chance=functools.partial(losses.chance_loss, kind), logit_bias=learned)


def regression(student_features: Callable, teacher_features: Callable) -> Objective:
    """``mean((student - teacher)^2)`` over the batch and the embedding width (PyTorch's
    ``MSELoss``) of ``student_features(model, batch)`` against the
    fixed ``teacher_features(model, batch)`` (no gradient reaches the teacher). Metrics:
    ``cosine``, the mean cosine similarity of the pairs, and ``same_language_fraction`` of the
    batch (its ``same_language`` column: the pairs whose two texts are one sentence)."""
    def features(model, batch):
        return {"student": student_features(model, batch).astype(jnp.float32),
                "teacher": jax.lax.stop_gradient(teacher_features(model, batch).astype(jnp.float32)),
                "same_language": batch["same_language"].astype(jnp.float32)}

    def loss(model, feats, mesh):
        del model, mesh
        value = jnp.mean(jnp.square(feats["student"] - feats["teacher"]))
        cos = jnp.sum(layers.l2_normalize(feats["student"]) * layers.l2_normalize(feats["teacher"]), axis=-1)
        return value, {"cosine": jnp.mean(cos), "same_language_fraction": jnp.mean(feats["same_language"])}

    return Objective(features, loss)


# The attribute a run of the sigmoid loss adds to the model it trains (see attach_logit_bias).
LOGIT_BIAS = "logit_bias"


def attach_logit_bias(model: nnx.Module, value: float) -> None:
    """Gives ``model`` a learnable scalar ``logit_bias`` (SigLIP's ``b``) for the sigmoid loss.
    ALIGN and AltCLIP have no such parameter, so the trainer attaches it for the run (it is trained
    and checkpointed with the model) and :func:`detach_logit_bias` removes it from what is
    exported, which stays an ordinary checkpoint of the reference architecture."""
    setattr(model, LOGIT_BIAS, nnx.Param(jnp.asarray(value, jnp.float32)))


def detach_logit_bias(model: nnx.Module) -> nnx.Module:
    if hasattr(model, LOGIT_BIAS):
        delattr(model, LOGIT_BIAS)
    return model


def logit_bias(model: nnx.Module):
    """The model's attached ``logit_bias``, else SigLIP's initial value held fixed."""
    bias = getattr(model, LOGIT_BIAS, None)
    return losses.SIGLIP_LOGIT_BIAS if bias is None else bias[...]
