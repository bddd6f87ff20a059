"""Contrastive image-text losses: the softmax (CLIP / ALIGN) and sigmoid (SigLIP) forms.

``contrastive_loss`` with ``mesh=None`` is the single-device reference; the ALIGN and AltCLIP
models use it for ``return_loss`` and it matches PyTorch's ``F.cross_entropy`` (including
``label_smoothing``) exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("softmax", "sigmoid")


def _logits(image_embeds, text_embeds, logit_scale, logit_bias):
    logits = logit_scale * (image_embeds @ text_embeds.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def _softmax_reference(logits, label_smoothing):
    # PyTorch's label smoothing: target = (1 - e) * one_hot + e / B, so the per-row loss is
    # lse - (1 - e) * logit_ii - (e / B) * sum_j logit_ij.
    b = logits.shape[0]
    diag = jnp.diagonal(logits)

    def direction(lse, row_sums):
        per_row = lse - (1.0 - label_smoothing) * diag - (label_smoothing / b) * row_sums
        return jnp.mean(per_row)

    i2t = direction(jax.nn.logsumexp(logits, axis=1), jnp.sum(logits, axis=1))
    t2i = direction(jax.nn.logsumexp(logits, axis=0), jnp.sum(logits, axis=0))
    return 0.5 * (i2t + t2i)


def _sigmoid_reference(logits):
    b = logits.shape[0]
    z = 2.0 * jnp.eye(b, dtype=logits.dtype) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / b


def contrastive_loss(image_embeds, text_embeds, *, kind, logit_scale, logit_bias=None,
                     label_smoothing=0.0, mesh=None, impl="gather"):
    """Contrastive loss of paired, L2-normalised image and text embeddings of shape (B, D).

    Logits are ``logit_scale * image_embeds @ text_embeds.T + logit_bias`` (the bias is meant for
    the sigmoid loss; the softmax loss is invariant to it); pass ``1 / temperature`` for ALIGN and ``exp(logit_scale)`` for AltCLIP.

    kind="softmax": mean of the image->text and text->image cross-entropies, each averaged over
        the batch, with PyTorch's label smoothing (target = (1 - e) one-hot + e / B).
    kind="sigmoid": SigLIP, ``-sum_ij log_sigmoid(z_ij * logit_ij) / B`` with z = +1 on the
        diagonal and -1 elsewhere.
    mesh=None: the plain single-device computation.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"expected two (B, D) arrays of equal shape, got {image_embeds.shape} "
                         f"and {text_embeds.shape}")
    if mesh is None:
        logits = _logits(image_embeds, text_embeds, logit_scale, logit_bias)
        if kind == "softmax":
            return _softmax_reference(logits, label_smoothing)
        return _sigmoid_reference(logits)
    raise NotImplementedError("sharded impls follow")
