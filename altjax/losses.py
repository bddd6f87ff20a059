"""Contrastive image-text losses: the softmax (CLIP / ALIGN) and sigmoid (SigLIP) forms.

``contrastive_loss`` with ``mesh=None`` is the single-device reference; the ALIGN and AltCLIP
models use it for ``return_loss`` and it matches PyTorch's ``F.cross_entropy`` (including
``label_smoothing``) exactly. With a mesh, the loss runs under ``jax.shard_map`` on embeddings
split along the batch over the mesh's batch axes (every axis except ``"model"``, see
``altjax.sharding.batch_axes``) and replicated over the model axis:

* ``impl="gather"`` all-gathers the embeddings; each device holds (B/N) x B blocks of logits.
* ``impl="ring"`` passes embedding blocks around the devices with ``ppermute``; each step touches
  one (B/N) x (B/N) block of logits and log-sum-exps are accumulated online. The backward pass is
  written by hand: it walks the ring again and recomputes each block (as flash attention does),
  so the logits cost O((B/N)^2) memory per device in both passes.

Both give the reference's value and gradients (embeddings, scale, bias) to fp32 rounding. Each
per-logit gradient is formed as in the unsharded computation (probability minus target, in one
place) before it is multiplied into the embeddings and the scale: summing the terms separately
would cancel catastrophically in the scale's gradient.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from altjax.sharding import batch_axes, batch_size_divisor

KINDS = ("softmax", "sigmoid")
IMPLS = ("gather", "ring")
# SigLIP's initial logit bias (with logit_scale 10): the training recipes that use the sigmoid loss
# on towers without a bias parameter hold it at this value.
SIGLIP_LOGIT_BIAS = -10.0


def _sum(row_sums):
    """Sum of per-row sums, kept a separate reduction.

    XLA:CPU reduces a whole (n, B) matrix with too few partial sums for some shapes: 2k terms
    already cost ~1e-7 of a result that is itself a cancellation (the scale's gradient), ten times
    the error of summing rows first. The barrier keeps XLA from merging the two reductions.
    """
    return jnp.sum(jax.lax.optimization_barrier(row_sums))


def _total(x):
    """Sum of a matrix, rows first (see ``_sum``)."""
    return _sum(jnp.sum(x, axis=1))


# The logits as custom VJPs only so that the scalars' gradients are summed rows first.


@jax.custom_vjp
def _scaled(dots, scale):
    return scale * dots


def _scaled_fwd(dots, scale):
    return scale * dots, (dots, scale)


def _scaled_bwd(res, ct):
    dots, scale = res
    return scale * ct, _total(ct * dots)


_scaled.defvjp(_scaled_fwd, _scaled_bwd)


@jax.custom_vjp
def _affine(dots, scale, bias):
    return scale * dots + bias


def _affine_fwd(dots, scale, bias):
    return scale * dots + bias, (dots, scale)


def _affine_bwd(res, ct):
    dots, scale = res
    return scale * ct, _total(ct * dots), _total(ct)


_affine.defvjp(_affine_fwd, _affine_bwd)


def _logits(image_embeds, text_embeds, logit_scale, logit_bias=None):
    """scale * image @ text^T (+ bias)."""
    if logit_bias is None:
        return _scaled(image_embeds @ text_embeds.T, logit_scale)
    return _affine(image_embeds @ text_embeds.T, logit_scale, logit_bias)


def _cross_entropy_rows(logits, targets, label_smoothing):
    """Per-row cross entropy with PyTorch's label smoothing; row i's class is ``targets[i]``.

    target = (1 - e) one_hot + e / C, so the loss is lse - (1 - e) logit_target - (e / C) sum(logits).
    """
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    num_classes = logits.shape[1]
    return (jax.nn.logsumexp(logits, axis=1) - (1.0 - label_smoothing) * target_logits
            - (label_smoothing / num_classes) * jnp.sum(logits, axis=1))


def _signed(logits, on_diagonal):
    """z * logits with z = +1 where ``on_diagonal``, -1 elsewhere."""
    return jnp.where(on_diagonal, logits, -logits)


def _reference_loss(image, text, scale, bias, kind, label_smoothing):
    logits = _logits(image, text, scale, bias)
    b = logits.shape[0]
    if kind == "sigmoid":
        return -_total(jax.nn.log_sigmoid(_signed(logits, jnp.eye(b, dtype=bool)))) / b
    targets = jnp.arange(b)
    i2t = jnp.mean(_cross_entropy_rows(logits, targets, label_smoothing))
    t2i = jnp.mean(_cross_entropy_rows(logits.T, targets, label_smoothing))
    return 0.5 * (i2t + t2i)


# The sharded versions see local blocks of n = B / N rows and return the global loss, summed over
# the devices with one psum.


def _gather_loss(image, text, scale, bias, *, kind, axes, num, label_smoothing):
    n = image.shape[0]
    global_b = n * num
    # Device-varying scalars, as the custom VJP of the logits returns per-device gradients;
    # pcast's transpose sums them.
    scale = jax.lax.pcast(scale, axes, to="varying")
    if bias is not None:
        bias = jax.lax.pcast(bias, axes, to="varying")
    targets = jax.lax.axis_index(axes) * n + jnp.arange(n)
    text_all = jax.lax.all_gather(text, axes, tiled=True)
    rows = _logits(image, text_all, scale, bias)
    if kind == "sigmoid":
        on_diagonal = jnp.arange(global_b)[None, :] == targets[:, None]
        local = _total(jax.nn.log_sigmoid(_signed(rows, on_diagonal)))
        return -jax.lax.psum(local, axes) / global_b
    # text->image: this device's texts against all images are the columns of the global logits
    # that belong to its texts, so both directions are local row-wise cross entropies.
    image_all = jax.lax.all_gather(image, axes, tiled=True)
    local = (jnp.sum(_cross_entropy_rows(rows, targets, label_smoothing))
             + jnp.sum(_cross_entropy_rows(_logits(text, image_all, scale), targets, label_smoothing)))
    return jax.lax.psum(local, axes) / (2.0 * global_b)


def _rotate(x, axes, num):
    """Sends every device's ``x`` (a pytree) to its successor on the ring of the batch axes."""
    return jax.lax.ppermute(x, axes, [(i, (i + 1) % num) for i in range(num)])


def _ring_scan(step, travelling, acc, axes, num):
    """Steps 1..N-1 of a ring: receive the predecessor's travelling arrays, fold them in.

    ``step(travelling, acc) -> (travelling, acc)``; returns the final pair. At step k a device
    holds the blocks that started k devices before it; step 0 (its own blocks, which hold the
    diagonal) is done by the caller.
    """
    def body(carry, _):
        travelling, acc = carry
        return step(_rotate(travelling, axes, num), acc), None

    (travelling, acc), _ = jax.lax.scan(body, (travelling, acc), length=num - 1)
    return travelling, acc


# Ring softmax. Image and text blocks travel together. Each device accumulates the image->text
# statistics of its images and the text->image statistics of its texts (rows of text @ visiting
# images^T), so no column statistics need to be sent back at the end. Per row and direction it
# keeps a running max m, the sum l of exp(logit - m) and the sum of the logits (for label
# smoothing). The backward pass recomputes the probabilities as exp((logit - m) - log l): with m
# an exact logit this is as accurate as the unsharded softmax, where an fp32 lse of size ~20 (or
# differentiating through the online updates) would cost several ulps.


def _fold_rows(stats, logits):
    """Folds a block of logits into running per-row (max, sum of exp(logit - max), sum)."""
    block_max = jnp.max(logits, axis=1)
    if stats is None:
        return block_max, jnp.sum(jnp.exp(logits - block_max[:, None]), axis=1), jnp.sum(logits, axis=1)
    m, l, total = stats
    new_m = jnp.maximum(m, block_max)
    l = l * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=1)
    return new_m, l, total + jnp.sum(logits, axis=1)


def _ring_softmax_forward(axes, num, label_smoothing, image, text, scale):
    def fold(stats, text_block, image_block):
        return (_fold_rows(stats[0], scale * (image @ text_block.T)),
                _fold_rows(stats[1], scale * (text @ image_block.T)))

    def step(blocks, stats):
        return blocks, fold(stats, *blocks)

    # The diagonal logits come from the own blocks, computed exactly as the reference does.
    diagonals = (jnp.diagonal(scale * (image @ text.T)), jnp.diagonal(scale * (text @ image.T)))
    stats = _ring_scan(step, (text, image), fold((None, None), text, image), axes, num)[1]
    global_b = image.shape[0] * num
    rows, saved = [], []
    for (m, l, total), diagonal in zip(stats, diagonals):
        log_l = jnp.log(l)
        rows.append(m + log_l - (1.0 - label_smoothing) * diagonal
                    - (label_smoothing / global_b) * total)
        saved.append((m, log_l))
    return tuple(rows), tuple(saved)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring_softmax_rows(axes, num, label_smoothing, image, text, scale):
    """Per-row cross entropies, (image->text of this device's images, text->image of its texts)."""
    return _ring_softmax_forward(axes, num, label_smoothing, image, text, scale)[0]


def _ring_softmax_rows_fwd(axes, num, label_smoothing, image, text, scale):
    rows, saved = _ring_softmax_forward(axes, num, label_smoothing, image, text, scale)
    return rows, (image, text, scale, saved)


def _ring_softmax_rows_bwd(axes, num, label_smoothing, res, cts):
    image, text, scale, ((m_i2t, log_l_i2t), (m_t2i, log_l_t2i)) = res
    global_b = image.shape[0] * num
    eye = jnp.eye(image.shape[0], dtype=image.dtype)

    def logit_grads(dots, m, log_l, ct, own):
        target = label_smoothing / global_b + ((1.0 - label_smoothing) * eye if own else 0.0)
        probabilities = jnp.exp((scale * dots - m[:, None]) - log_l[:, None])
        return ct[:, None] * (probabilities - target)

    def block_grads(text_block, image_block, own):
        dots_i2t = image @ text_block.T
        dots_t2i = text @ image_block.T
        g_i2t = logit_grads(dots_i2t, m_i2t, log_l_i2t, cts[0], own)
        g_t2i = logit_grads(dots_t2i, m_t2i, log_l_t2i, cts[1], own)
        local = (scale * (g_i2t @ text_block), scale * (g_t2i @ image_block),
                 jnp.sum(g_i2t * dots_i2t, axis=1) + jnp.sum(g_t2i * dots_t2i, axis=1))
        visiting = (scale * (g_i2t.T @ image), scale * (g_t2i.T @ text))
        return local, visiting

    def step(travelling, acc):
        text_block, image_block, d_text_block, d_image_block = travelling
        local, (d_text_new, d_image_new) = block_grads(text_block, image_block, False)
        travelling = (text_block, image_block, d_text_block + d_text_new, d_image_block + d_image_new)
        return travelling, jax.tree.map(jnp.add, acc, local)

    local, visiting = block_grads(text, image, True)
    travelling, (d_image, d_text, d_scale_rows) = _ring_scan(
        step, (text, image) + visiting, local, axes, num)
    # After N-1 shifts each device holds its successor's blocks: one more shift sends their
    # gradients home.
    d_text_home, d_image_home = _rotate(travelling[2:], axes, num)
    return d_image + d_image_home, d_text + d_text_home, _sum(d_scale_rows)


_ring_softmax_rows.defvjp(_ring_softmax_rows_fwd, _ring_softmax_rows_bwd)


# Ring sigmoid: only the text blocks travel; the diagonal lies in the block each device starts
# with. The backward pass walks the ring again with the visiting text blocks' gradients.


def _own_signed(logits, own):
    return _signed(logits, jnp.eye(logits.shape[0], dtype=bool)) if own else -logits


def _ring_sigmoid_forward(axes, num, image, text, scale, bias):
    def rows(text_block, own):
        logits = scale * (image @ text_block.T) + bias
        return jnp.sum(jax.nn.log_sigmoid(_own_signed(logits, own)), axis=1)

    def step(text_block, acc):
        return text_block, acc + rows(text_block, False)

    return _ring_scan(step, text, rows(text, True), axes, num)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_sigmoid_rows(axes, num, image, text, scale, bias):
    """Per-row sums over all texts of log_sigmoid(z * logits) for this device's images, (n,)."""
    return _ring_sigmoid_forward(axes, num, image, text, scale, bias)


def _ring_sigmoid_rows_fwd(axes, num, image, text, scale, bias):
    return _ring_sigmoid_forward(axes, num, image, text, scale, bias), (image, text, scale, bias)


def _ring_sigmoid_rows_bwd(axes, num, res, ct):
    image, text, scale, bias = res

    def block_grads(text_block, own):
        dots = image @ text_block.T
        # d log_sigmoid(x) / dx = sigmoid(-x), and d(z * logit) / d logit = z.
        g = _own_signed(ct[:, None] * jax.nn.sigmoid(-_own_signed(scale * dots + bias, own)), own)
        local = (scale * (g @ text_block), jnp.sum(g * dots, axis=1), jnp.sum(g, axis=1))
        return local, scale * (g.T @ image)

    def step(travelling, acc):
        text_block, d_text_block = travelling
        local, visiting = block_grads(text_block, False)
        return (text_block, d_text_block + visiting), jax.tree.map(jnp.add, acc, local)

    local, visiting = block_grads(text, True)
    travelling, (d_image, d_scale_rows, d_bias_rows) = _ring_scan(
        step, (text, visiting), local, axes, num)
    d_text = _rotate(travelling[1], axes, num)
    return d_image, d_text, _sum(d_scale_rows), _sum(d_bias_rows)


_ring_sigmoid_rows.defvjp(_ring_sigmoid_rows_fwd, _ring_sigmoid_rows_bwd)


def _ring_loss(image, text, scale, bias, *, kind, axes, num, label_smoothing):
    global_b = image.shape[0] * num
    # The scalars enter the hand-written VJPs as device-varying values, so that pcast's transpose
    # sums their per-device gradients over the ring.
    scale = jax.lax.pcast(scale, axes, to="varying")
    if kind == "sigmoid":
        bias = jax.lax.pcast(jnp.zeros_like(scale) if bias is None else bias, axes, to="varying")
        rows = _ring_sigmoid_rows(axes, num, image, text, scale, bias)
        return -jax.lax.psum(jnp.sum(rows), axes) / global_b
    rows_i2t, rows_t2i = _ring_softmax_rows(axes, num, float(label_smoothing), image, text, scale)
    return jax.lax.psum(jnp.sum(rows_i2t) + jnp.sum(rows_t2i), axes) / (2.0 * global_b)


def chance_loss(kind: str, batch_size: int) -> float:
    """The contrastive loss of a model that has learned nothing, for a global batch of
    ``batch_size`` pairs: every candidate equally likely. Softmax: ``log B`` (label smoothing does
    not change it). Sigmoid: the best constant prediction, ``p = 1/B`` for every pair, costs
    ``-(log p + (B - 1) log(1 - p))`` per row. A loss that stays at this level has learned
    nothing, whatever its temperature does."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    b = int(batch_size)
    if kind == "softmax" or b == 1:
        return math.log(b)
    return -(math.log(1.0 / b) + (b - 1) * math.log1p(-1.0 / b))


def contrastive_loss(image_embeds, text_embeds, *, kind, logit_scale, logit_bias=None,
                     label_smoothing=0.0, mesh=None, impl="gather"):
    """Contrastive loss of paired, L2-normalised image and text embeddings of shape (B, D).

    Logits are ``logit_scale * image_embeds @ text_embeds.T``, plus ``logit_bias`` for the sigmoid
    loss (the softmax loss is invariant to a bias, so it ignores one). Pass ``1 / temperature``
    for ALIGN and ``exp(logit_scale)`` for AltCLIP; both scalars may be traced (learnable).

    kind="softmax": mean of the image->text and text->image cross entropies, each averaged over
        the batch, with PyTorch's label smoothing (target = (1 - e) one-hot + e / B, e a Python
        float).
    kind="sigmoid": SigLIP, ``-sum_ij log_sigmoid(z_ij * logit_ij) / B`` with z = +1 on the
        diagonal and -1 elsewhere.
    mesh=None: the plain single-device computation (the reference).
    mesh=Mesh: the embeddings are (or are resharded to be) split along the batch over
        ``altjax.sharding.batch_axes(mesh)``, i.e. every mesh axis except ``"model"``, and
        replicated over ``"model"``; ``impl`` picks "gather" or "ring" (see the module docstring).
        B must be divisible by the number of devices on the batch axes.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"expected two (B, D) arrays of equal shape, got {image_embeds.shape} "
                         f"and {text_embeds.shape}")
    if kind == "softmax":
        logit_bias = None
    # The loss is computed in (at least) fp32 whatever the embeddings' compute dtype.
    dtype = jnp.promote_types(image_embeds.dtype, jnp.float32)
    scalars = [jnp.asarray(logit_scale, dtype)]
    if logit_bias is not None:
        scalars.append(jnp.asarray(logit_bias, dtype))
    if mesh is None:
        return _reference_loss(jnp.asarray(image_embeds, dtype), jnp.asarray(text_embeds, dtype),
                               scalars[0], scalars[1] if logit_bias is not None else None, kind,
                               label_smoothing)

    axes = batch_axes(mesh)
    num = batch_size_divisor(mesh)
    global_b = image_embeds.shape[0]
    if global_b % num:
        raise ValueError(f"contrastive_loss: the global batch {global_b} is not divisible by the "
                         f"{num} devices on the mesh's batch axes {axes}")

    local_loss = _ring_loss if impl == "ring" else _gather_loss

    def body(image, text, scale, *maybe_bias):
        bias = maybe_bias[0] if maybe_bias else None
        return local_loss(image.astype(dtype), text.astype(dtype), scale, bias, kind=kind,
                          axes=axes, num=num, label_smoothing=label_smoothing)

    batch_spec = P(axes, None)
    sharded = jax.shard_map(body, mesh=mesh, out_specs=P(),
                            in_specs=(batch_spec, batch_spec) + (P(),) * len(scalars))
    return sharded(image_embeds, text_embeds, *scalars)
