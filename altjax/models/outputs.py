"""Model outputs: pytree dataclasses with the field names of transformers' ModelOutputs.

They are ``flax.struct`` dataclasses so that a jitted function can return them.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
from flax import struct


@struct.dataclass
class TowerOutput:
    """One tower's output, as HF's ``BaseModelOutputWithPooling``.

    ``last_hidden_state`` is (B, L, D) for text and ViT towers and (B, H, W, C) (NHWC) for the
    EfficientNet tower (the PyTorch reference returns NCHW there). ``pooler_output`` is (B, D).
    ``hidden_states`` is filled only when asked for.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Optional[tuple[jax.Array, ...]] = None


@struct.dataclass
class DualEncoderOutput:
    """The output of ``AlignModel`` and ``AltCLIPModel`` (HF's ``AlignOutput`` / ``AltCLIPOutput``).

    ``text_embeds`` and ``image_embeds`` are L2-normalised. ``logits_per_text`` is (B_text, B_image)
    and ``logits_per_image`` its transpose. ``loss`` is set only when ``return_loss=True``.
    """

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array
    text_model_output: TowerOutput
    vision_model_output: TowerOutput
    loss: Optional[jax.Array] = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)
