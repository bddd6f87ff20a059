"""Checks of the arrays a model is called with, shared by every public model at its API boundary.

JAX's gather clamps an out-of-range index instead of failing, so token ids from another model's
tokenizer, or a 1-D ``input_ids``, would otherwise come back as plausible numbers. The public
models (dual encoders, towers, the CLIP text teacher) call :func:`check_text` /
:func:`check_pixels` first; a mistake raises a ``ValueError`` that names the model, the argument
and what was expected.

Two kinds of check:

* static ones (rank, dtype, shapes, sequence length against ``max_position_embeddings``) read only
  shapes and dtypes, so they run on every call, traced or not, at no cost to a compiled step;
* value ones (token ids in ``[0, vocab_size)``, token types, position ids, RoBERTa's counted
  positions) read the data, so they run only on concrete arrays (an eager call). Under ``jax.jit``
  (or ``grad``, ``vmap``, ``remat``) the arguments are tracers and these checks are skipped: the
  jitted step is exactly what it was.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x: Any) -> bool:
    """True for an abstract value inside a JAX transformation (jit, grad, vmap, remat, ...)."""
    return isinstance(x, jax.core.Tracer)


def _array(x: Any) -> Any:
    # jax and NumPy arrays and tracers have shape and dtype; lists and scalars become NumPy arrays.
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _is_integer(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer)


def _first_outside(x: Any, low: int, high: int) -> Optional[tuple[int, tuple[int, ...]]]:
    """The first value of ``x`` outside ``[low, high)`` and its index, or None (None for a tracer)."""
    if is_traced(x) or x.size == 0:
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # A global array spread over processes: only reductions can be read here.
        lo, hi = (int(v) for v in jax.device_get((jnp.min(x), jnp.max(x))))
        if lo < low:
            return lo, ()
        return (hi, ()) if hi >= high else None
    a = np.asarray(x)
    lo, hi = a.min(), a.max()
    if lo >= low and hi < high:
        return None
    index = tuple(int(i) for i in np.argwhere((a < low) | (a >= high))[0])
    return int(a[index]), index


def _at(index: tuple[int, ...]) -> str:
    return f" at [{', '.join(map(str, index))}]" if index else ""


def _check_2d(model: str, name: str, x: Any) -> None:
    if x.ndim != 2:
        hint = f"; add the batch dimension ({name}[None])" if x.ndim == 1 else ""
        raise ValueError(
            f"{model}: {name} must be a 2-D array (batch, sequence_length), got shape {tuple(x.shape)}{hint}"
        )


def _check_ids_dtype(model: str, name: str, x: Any, what: str) -> None:
    if not _is_integer(x.dtype):
        raise ValueError(f"{model}: {name} must hold integer {what}, got dtype {x.dtype}")


def _check_like_ids(model: str, name: str, x: Any, shape: tuple[int, int], *, broadcast: bool) -> None:
    """A per-token argument: (B, L) like ``input_ids`` or, where ``broadcast``, also (1, L)."""
    _check_2d(model, name, x)
    b, length = shape
    ok = x.shape[1] == length and (x.shape[0] == b or (broadcast and x.shape[0] == 1))
    if not ok:
        allowed = f"{(b, length)} or {(1, length)}" if broadcast else f"{(b, length)}"
        raise ValueError(
            f"{model}: {name} has shape {tuple(x.shape)} but input_ids has shape {(b, length)}; "
            f"{name} must be {allowed}, one entry per token"
        )


def check_text(
    model: str,
    config: Any,
    input_ids: Any,
    attention_mask: Any = None,
    token_type_ids: Any = None,
    position_ids: Any = None,
    *,
    roberta_positions: bool = False,
) -> None:
    """Checks a text tower's arguments; raises ``ValueError`` naming ``model`` and the argument.

    ``config`` gives ``vocab_size``, ``max_position_embeddings`` and, where the tower has token
    types, ``type_vocab_size``. ``input_ids`` must be integer (B, L) with 1 <= L and every id in
    ``[0, vocab_size)``; ``attention_mask`` integer or boolean (B, L); ``token_type_ids`` and
    ``position_ids`` integer (B, L) or (1, L) within their tables. Default position ids are
    ``arange(L)``, so L may not exceed ``max_position_embeddings``; with ``roberta_positions``
    they are counted over the non-pad tokens from ``pad_token_id + 1`` (XLM-R), so each row may
    hold at most ``max_position_embeddings - pad_token_id - 1`` tokens that are not padding.
    Value checks are skipped for traced arguments (see the module docstring).
    """
    if input_ids is None:
        raise ValueError(f"{model}: input_ids is required")
    ids = _array(input_ids)
    _check_2d(model, "input_ids", ids)
    _check_ids_dtype(model, "input_ids", ids, "token ids")
    shape = tuple(ids.shape)
    if shape[1] == 0:
        raise ValueError(f"{model}: input_ids has no tokens (shape {shape})")
    max_positions = config.max_position_embeddings
    if position_ids is None and not roberta_positions and shape[1] > max_positions:
        raise ValueError(
            f"{model}: input_ids has sequence length {shape[1]} but max_position_embeddings is {max_positions}; "
            f"truncate the texts to at most {max_positions} tokens (the tokenizer's max_length)"
        )
    mask = types = positions = None
    if attention_mask is not None:
        mask = _array(attention_mask)
        if mask.ndim != 2 or tuple(mask.shape) != shape:
            raise ValueError(
                f"{model}: attention_mask has shape {tuple(mask.shape)} but input_ids has shape {shape}; "
                "they must match, one mask entry per token"
            )
        if not (_is_integer(mask.dtype) or mask.dtype == jnp.bool_):
            raise ValueError(
                f"{model}: attention_mask must be integer or boolean (1 = attend, 0 = padding), got dtype {mask.dtype}"
            )
    if token_type_ids is not None:
        types = _array(token_type_ids)
        _check_like_ids(model, "token_type_ids", types, shape, broadcast=True)
        _check_ids_dtype(model, "token_type_ids", types, "token type ids")
    if position_ids is not None:
        positions = _array(position_ids)
        _check_like_ids(model, "position_ids", positions, shape, broadcast=True)
        _check_ids_dtype(model, "position_ids", positions, "position ids")

    # Value checks: concrete arrays only.
    vocab = config.vocab_size
    if (bad := _first_outside(ids, 0, vocab)) is not None:
        value, index = bad
        if value < 0:
            raise ValueError(
                f"{model}: input_ids holds token id {value}{_at(index)} but token ids must lie in 0..{vocab - 1}; "
                "negative values are not tokens (a label or padding fill such as -100 or -1?)"
            )
        raise ValueError(
            f"{model}: input_ids holds token id {value}{_at(index)} but the text vocabulary has {vocab} ids "
            f"(0..{vocab - 1}); were these ids made by another model's tokenizer?"
        )
    if types is not None and (bad := _first_outside(types, 0, config.type_vocab_size)) is not None:
        n = config.type_vocab_size
        raise ValueError(
            f"{model}: token_type_ids holds {bad[0]}{_at(bad[1])} but the model has {n} token "
            f"type{'s' if n != 1 else ''} (0..{n - 1}, type_vocab_size)"
        )
    if positions is not None and (bad := _first_outside(positions, 0, max_positions)) is not None:
        raise ValueError(
            f"{model}: position_ids holds {bad[0]}{_at(bad[1])} but the model has {max_positions} positions "
            f"(0..{max_positions - 1}, max_position_embeddings)"
        )
    if positions is None and roberta_positions and not is_traced(ids):
        pad = config.pad_token_id
        fit = max_positions - pad - 1
        if shape[1] > fit:  # otherwise no row can overflow
            if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
                # A global array spread over processes: only the longest row's count can be read.
                row, count = None, int(jax.device_get(jnp.max(jnp.sum(ids != pad, axis=1))))
            else:
                counts = np.sum(np.asarray(ids) != pad, axis=1)
                row = int(np.argmax(counts))
                count = int(counts[row])
            if count > fit:
                which = "a row" if row is None else f"row {row}"
                raise ValueError(
                    f"{model}: input_ids {which} has {count} tokens that are not padding "
                    f"(pad_token_id {pad}), but with max_position_embeddings {max_positions} at most {fit} fit "
                    f"(positions count from {pad + 1}); truncate the texts to {fit} tokens"
                )


def check_pixels(
    model: str,
    pixel_values: Any,
    channels: int,
    *,
    nchw: bool,
    image_size: Optional[int] = None,
) -> None:
    """Checks image arguments; raises ``ValueError`` naming ``model`` and ``pixel_values``.

    ``pixel_values`` must be a floating 4-D batch with ``channels`` channels: NHWC
    (B, H, W, C), or, where ``nchw`` (the dual encoders, which transpose it as
    ``layers.to_nhwc`` does), NCHW (B, C, H, W). With ``image_size``, H and W must equal it (a ViT
    without ``interpolate_pos_encoding``). All of these read only shapes and dtypes.
    """
    if pixel_values is None:
        raise ValueError(f"{model}: pixel_values is required")
    x = _array(pixel_values)
    shape = tuple(x.shape)
    layouts = f"NHWC (B, H, W, {channels})" + (f" or NCHW (B, {channels}, H, W)" if nchw else "")
    if x.ndim != 4:
        hint = "; add the batch dimension (pixel_values[None])" if x.ndim == 3 else ""
        raise ValueError(f"{model}: pixel_values must be a 4-D batch of images, {layouts}; got shape {shape}{hint}")
    if shape[-1] == channels:
        height, width = shape[1], shape[2]
    elif nchw and shape[1] == channels:
        height, width = shape[2], shape[3]
    else:
        hint = (
            "; this looks like NCHW: transpose to NHWC (the towers take NHWC; the dual encoders accept both)"
            if shape[1] == channels else ""
        )
        raise ValueError(
            f"{model}: pixel_values has shape {shape} but the model takes {channels}-channel images, {layouts}{hint}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{model}: pixel_values must be floating point (the image processor's normalised output), got dtype "
            f"{x.dtype}; raw {x.dtype} pixels need the model's processor first"
        )
    if image_size is not None and (height, width) != (image_size, image_size):
        raise ValueError(
            f"{model}: pixel_values: Input image size ({height}*{width}) doesn't match model "
            f"({image_size}*{image_size}); pass interpolate_pos_encoding=True to resize the position embeddings"
        )


def check_pairs(model: str, input_ids: Any, pixel_values: Any, return_loss: bool) -> None:
    """Both arguments of a dual encoder's call are given; with ``return_loss`` (texts and images
    paired by index) their batch sizes must match."""
    missing = [name for name, x in (("input_ids", input_ids), ("pixel_values", pixel_values)) if x is None]
    if missing:
        raise ValueError(f"{model} needs both input_ids and pixel_values ({' and '.join(missing)} not given); "
                         "get_text_features / get_image_features embed one side only")
    if return_loss:
        texts, images = _array(input_ids), _array(pixel_values)
        if texts.ndim and images.ndim and texts.shape[0] != images.shape[0]:
            raise ValueError(
                f"{model}: return_loss pairs texts and images by index, but input_ids has {texts.shape[0]} rows "
                f"and pixel_values {images.shape[0]} image{'s' if images.shape[0] != 1 else ''}"
            )
