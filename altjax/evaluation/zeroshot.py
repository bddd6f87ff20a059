"""Zero-shot classifiers: one embedding per class, the renormalised mean of its prompt embeddings."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from altjax.evaluation.templates import check_templates, fill_template


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def zeroshot_classifier(
    encode_text: Callable[[list[str]], jax.Array],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> jax.Array:
    """The (C, D) float32 zero-shot classifier (prompt ensembling, as CLIP, ALIGN and open_clip).

    For each class, every template is filled with the class name, the prompts are embedded with
    ``encode_text`` (a callable from a list of strings to (n, D) embeddings, normalised or not),
    each embedding is L2-normalised, the class's embeddings are averaged, and the mean is
    L2-normalised again. ``encode_text`` is called once per class with ``len(templates)`` prompts,
    in template order.
    """
    templates = check_templates(templates)
    if isinstance(classnames, str) or not classnames:
        raise ValueError(f"classnames must be a non-empty list of strings, got {classnames!r}")
    rows = []
    for classname in classnames:
        prompts = [fill_template(t, classname) for t in templates]
        embeds = jnp.asarray(encode_text(prompts), jnp.float32)
        if embeds.ndim != 2 or embeds.shape[0] != len(prompts):
            raise ValueError(
                f"encode_text returned shape {embeds.shape} for {len(prompts)} prompts of class "
                f"{classname!r}, expected ({len(prompts)}, D)"
            )
        rows.append(_normalize(jnp.mean(_normalize(embeds), axis=0)))
    return jnp.stack(rows)
