"""Contrastive image-text losses: the softmax (CLIP / ALIGN) and sigmoid (SigLIP) forms.

``contrastive_loss`` with ``mesh=None`` is the single-device reference; the ALIGN and AltCLIP
models use it for ``return_loss`` and it matches PyTorch's ``F.cross_entropy`` (including
``label_smoothing``) exactly. With a mesh, the loss runs under ``jax.shard_map`` on embeddings
sharded along the batch over the mesh's batch axes (every axis except ``"model"``, see
``altjax.sharding.batch_axes``) and replicated over the model axis:

* ``impl="gather"`` all-gathers the embeddings; each device holds a (B/N) x B block of logits.
* ``impl="ring"`` passes embedding blocks around the devices with ``ppermute``; each step touches
  one (B/N) x (B/N) block of logits, log-sum-exps are accumulated online, and every step is
  rematerialised in the backward pass, so the logits cost O((B/N)^2) memory per device.

Both give the reference's value and gradients (embeddings, scale, bias) to fp32 rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from altjax.sharding import batch_axes

KINDS = ("softmax", "sigmoid")
IMPLS = ("gather", "ring")


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


# The sharded versions below see local blocks of n = B / N rows. Each returns this device's share
# of the loss *sum* (psum'd by the caller's shard_map body), so every variant ends in one psum.


def _softmax_total(image, text, scale, bias, lse_i2t, lse_t2i, axes, global_b, label_smoothing):
    """Sum over devices of both directions' per-row losses, given this device's row LSEs."""
    diag = scale * jnp.sum(image * text, axis=-1)
    if bias is not None:
        diag = diag + bias
    local = jnp.sum(lse_i2t) + jnp.sum(lse_t2i) - 2.0 * (1.0 - label_smoothing) * jnp.sum(diag)
    total = jax.lax.psum(local, axes)
    if label_smoothing:
        # The smoothing term needs sum_ij logit_ij, the same in both directions; it factorises
        # into the dot product of the summed image and text embeddings.
        image_sum = jax.lax.psum(jnp.sum(image, axis=0), axes)
        text_sum = jax.lax.psum(jnp.sum(text, axis=0), axes)
        all_logits = scale * jnp.dot(image_sum, text_sum)
        if bias is not None:
            all_logits = all_logits + bias * global_b * global_b
        total = total - 2.0 * (label_smoothing / global_b) * all_logits
    return total / (2.0 * global_b)


def _gather_loss(image, text, scale, bias, *, kind, axes, num, label_smoothing):
    n = image.shape[0]
    global_b = n * num
    text_all = jax.lax.all_gather(text, axes, tiled=True)
    rows = _logits(image, text_all, scale, bias)
    if kind == "sigmoid":
        first_row = jax.lax.axis_index(axes) * n
        on_diag = jnp.arange(global_b)[None, :] == (first_row + jnp.arange(n))[:, None]
        local = jnp.sum(jax.nn.log_sigmoid(jnp.where(on_diag, rows, -rows)))
        return -jax.lax.psum(local, axes) / global_b
    image_all = jax.lax.all_gather(image, axes, tiled=True)
    # text->image: this device's texts against all images are the columns of the global logits
    # that belong to its texts, so both directions' LSEs are local row LSEs.
    lse_i2t = jax.nn.logsumexp(rows, axis=1)
    lse_t2i = jax.nn.logsumexp(_logits(text, image_all, scale, bias), axis=1)
    return _softmax_total(image, text, scale, bias, lse_i2t, lse_t2i, axes, global_b, label_smoothing)


def _rotate(x, axes, num):
    """Sends every device's ``x`` to its successor on the ring of the batch axes."""
    return jax.lax.ppermute(x, axes, [(i, (i + 1) % num) for i in range(num)])


def _ring_scan(step, travelling, acc, axes, num):
    """Steps 1..N-1 of a ring: receive the predecessor's travelling arrays, fold them in.

    ``step(travelling, acc) -> (travelling, acc)``; returns the final pair. At step k a device
    holds the blocks of the device k places before it.
    """
    def body(carry, _):
        travelling, acc = carry
        return step(_rotate(travelling, axes, num), acc), None

    (travelling, acc), _ = jax.lax.scan(body, (travelling, acc), length=num - 1)
    return travelling, acc


# Ring softmax: image and text blocks travel together. Each device accumulates the image->text
# LSEs of its images and the text->image LSEs of its texts (the row LSEs of text @ visiting
# images^T), so no column statistics need to be sent back. The LSE is kept online as a running
# max m and a sum l of exp(logit - m). The hand-written backward pass walks the ring again,
# recomputing each (n x n) block from the saved (m, log l) as flash attention does, with the
# visiting blocks' gradients travelling along; memory stays O(n^2 + n D) per device. The
# probabilities are exp((logit - m) - log l): with m an exact logit this is as accurate as the
# unsharded softmax (an fp32 lse of size ~20, or differentiating through the online updates,
# would cost several ulps of p).


def _online_lse(stats, logits):
    """Folds a block of logits (rows x cols) into running row statistics (max, sum of exps)."""
    block_max = jnp.max(logits, axis=1)
    if stats is None:
        return block_max, jnp.sum(jnp.exp(logits - block_max[:, None]), axis=1)
    m, l = stats
    new_m = jnp.maximum(m, block_max)
    return new_m, l * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=1)


def _ring_softmax_stats(axes, num, image, text, scale):
    def fold(stats, text_block, image_block):
        return (_online_lse(stats[0], scale * (image @ text_block.T)),
                _online_lse(stats[1], scale * (text @ image_block.T)))

    def step(blocks, stats):
        return blocks, fold(stats, *blocks)

    stats = _ring_scan(step, (text, image), fold((None, None), text, image), axes, num)[1]
    # (max, log-sum) per direction.
    return tuple((m, jnp.log(l)) for m, l in stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_softmax_lses(axes, num, image, text, scale):
    """(image->text LSE of this device's images, text->image LSE of its texts), both (n,)."""
    return tuple(m + log_l for m, log_l in _ring_softmax_stats(axes, num, image, text, scale))


def _ring_softmax_lses_fwd(axes, num, image, text, scale):
    stats = _ring_softmax_stats(axes, num, image, text, scale)
    return tuple(m + log_l for m, log_l in stats), (image, text, scale, stats)


def _ring_softmax_lses_bwd(axes, num, res, cts):
    image, text, scale, ((m_i2t, log_l_i2t), (m_t2i, log_l_t2i)) = res
    ct_i2t, ct_t2i = cts

    def probabilities(dots, m, log_l):
        return jnp.exp((scale * dots - m[:, None]) - log_l[:, None])

    def block_grads(text_block, image_block):
        dots_i2t = image @ text_block.T
        dots_t2i = text @ image_block.T
        g_i2t = ct_i2t[:, None] * probabilities(dots_i2t, m_i2t, log_l_i2t)
        g_t2i = ct_t2i[:, None] * probabilities(dots_t2i, m_t2i, log_l_t2i)
        local = (scale * (g_i2t @ text_block), scale * (g_t2i @ image_block),
                 jnp.sum(g_i2t * dots_i2t, axis=1) + jnp.sum(g_t2i * dots_t2i, axis=1))
        visiting = (scale * (g_i2t.T @ image), scale * (g_t2i.T @ text))
        return local, visiting

    def step(travelling, acc):
        text_block, image_block, d_text_block, d_image_block = travelling
        local, (d_text_new, d_image_new) = block_grads(text_block, image_block)
        travelling = (text_block, image_block, d_text_block + d_text_new, d_image_block + d_image_new)
        return travelling, jax.tree.map(jnp.add, acc, local)

    local, visiting = block_grads(text, image)
    travelling, (d_image, d_text, d_scale_rows) = _ring_scan(
        step, (text, image) + visiting, local, axes, num)
    # After N-1 shifts each device holds its successor's blocks: one more shift sends their
    # gradients home.
    d_text_home, d_image_home = _rotate(travelling[2:], axes, num)
    return d_image + d_image_home, d_text + d_text_home, jnp.sum(d_scale_rows)


_ring_softmax_lses.defvjp(_ring_softmax_lses_fwd, _ring_softmax_lses_bwd)


# Ring sigmoid: only the text blocks travel; the diagonal lies in the block each device starts
# with. The backward pass is built the same way as the softmax one.


def _signed(logits, own):
    """z * logits: z = +1 on the diagonal (only in a device's own block), -1 elsewhere."""
    if not own:
        return -logits
    return jnp.where(jnp.eye(logits.shape[0], dtype=bool), logits, -logits)


def _ring_sigmoid_forward(axes, num, image, text, scale, bias):
    def rows(text_block, own):
        logits = scale * (image @ text_block.T) + bias
        return jnp.sum(jax.nn.log_sigmoid(_signed(logits, own)), axis=1)

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
        g = _signed(ct[:, None] * jax.nn.sigmoid(-_signed(scale * dots + bias, own)), own)
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
    return d_image, d_text, jnp.sum(d_scale_rows), jnp.sum(d_bias_rows)


_ring_sigmoid_rows.defvjp(_ring_sigmoid_rows_fwd, _ring_sigmoid_rows_bwd)


def _ring_loss(image, text, scale, bias, *, kind, axes, num, label_smoothing):
    global_b = image.shape[0] * num
    # The scalars enter the hand-written VJPs as device-varying values, so their per-device
    # gradients get summed over the ring by pcast's transpose.
    scale_v = jax.lax.pcast(scale, axes, to="varying")
    if kind == "sigmoid":
        bias_v = jax.lax.pcast(jnp.zeros_like(scale) if bias is None else bias, axes, to="varying")
        rows = _ring_sigmoid_rows(axes, num, image, text, scale_v, bias_v)
        return -jax.lax.psum(jnp.sum(rows), axes) / global_b
    lse_i2t, lse_t2i = _ring_softmax_lses(axes, num, image, text, scale_v)
    return _softmax_total(image, text, scale, bias, lse_i2t, lse_t2i, axes, global_b, label_smoothing)


def contrastive_loss(image_embeds, text_embeds, *, kind, logit_scale, logit_bias=None,
                     label_smoothing=0.0, mesh=None, impl="gather"):
    """Contrastive loss of paired, L2-normalised image and text embeddings of shape (B, D).

    Logits are ``logit_scale * image_embeds @ text_embeds.T`` plus, for the sigmoid loss,
    ``logit_bias`` (the softmax loss is invariant to a bias, so it ignores one); pass ``1 / temperature`` for ALIGN and
    ``exp(logit_scale)`` for AltCLIP. Both scalars may be traced (learnable).

    kind="softmax": mean of the image->text and text->image cross-entropies, each averaged over
        the batch, with PyTorch's label smoothing (target = (1 - e) one-hot + e / B).
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
    if mesh is None:
        logits = _logits(image_embeds, text_embeds, logit_scale, logit_bias)
        if kind == "softmax":
            return _softmax_reference(logits, label_smoothing)
        return _sigmoid_reference(logits)

    axes = batch_axes(mesh)
    num = 1
    for name in axes:
        num *= mesh.shape[name]
    global_b = image_embeds.shape[0]
    if global_b % num:
        raise ValueError(f"contrastive_loss: the global batch {global_b} is not divisible by the "
                         f"{num} devices on the mesh's batch axes {axes}")

    dtype = jnp.promote_types(image_embeds.dtype, jnp.float32)
    scalars = [jnp.asarray(logit_scale, dtype)]
    if logit_bias is not None:
        scalars.append(jnp.asarray(logit_bias, dtype))
    local_loss = _ring_loss if impl == "ring" else _gather_loss

    def body(image, text, scale, *maybe_bias):
        bias = maybe_bias[0] if maybe_bias else None
        return local_loss(image.astype(dtype), text.astype(dtype), scale, bias, kind=kind,
                          axes=axes, num=num, label_smoothing=label_smoothing)

    batch_spec = P(axes, None)
    sharded = jax.shard_map(body, mesh=mesh, out_specs=P(),
                            in_specs=(batch_spec, batch_spec) + (P(),) * len(scalars))
    return sharded(image_embeds, text_embeds, *scalars)
