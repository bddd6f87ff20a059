"""Image-text retrieval recall and zero-shot classification accuracy, computed from ranks.

Every metric here reduces to one quantity per query: its *rank*, the number of wrong candidates
whose score is not strictly below that of the best-scoring correct candidate. A query is a hit at
K when ``rank < K``. For text->image retrieval the query is a caption and the single correct
candidate is its image; for image->text retrieval the query is an image and the correct candidates
are all its captions (a hit when ANY of them is in the top K, the CLIP/ALIGN convention, not the
"actual recall" fraction); for zero-shot classification the query is an image and the correct
candidate its class.

Ties count against the model (pessimistic ranking). A wrong candidate whose score equals the
correct one's is ranked ahead of it: a correct candidate tied with one wrong candidate is a miss
at K=1 and a hit at K=2. A model that gives every candidate the same score (a collapsed model
that embeds every text alike) therefore ranks each query's answer last, and scores 0 at top-1
rather than 100. NaN scores count as ahead too, so broken embeddings never score. Other correct
candidates (an image's other captions) never count against it. clip_benchmark and open_clip take
``torch.topk`` of the score rows, which leaves the order of equal scores unspecified; both agree
with this rule whenever no wrong candidate ties with the correct one, which is always the case for
real embeddings except duplicated captions or images (COCO and Flickr30k hold a few). The rule
also makes the result independent of the candidate order and of how the work is split into blocks
or devices, so a sharded evaluation equals the single-device one exactly.

Memory. Scores are never formed in full: queries are processed ``block_size`` at a time against
all candidates (a ``lax.map`` over blocks). XLA's memory analysis of the compiled function puts
the temporaries at about three ``block_size x num_candidates`` float32 buffers: for 25k images x
125k captions (D = 640, block 256) 73 MB for text->image and 366 MB for image->text, whatever the
number of queries. With a ``mesh``, queries are split over the mesh's devices and the candidates
all-gathered on each (another ``num_candidates x D`` floats per device).

Scores are float32 matmuls at ``Precision.HIGHEST``: bfloat16 embeddings are upcast first, and the
TPU/GPU default (bf16 passes) would create spurious ties and flip near-ties.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AxisSpec = Optional[Union[str, Sequence[str]]]

RECALL_KS = (1, 5, 10)
DEFAULT_BLOCK_SIZE = 256


def _block_ranks(queries, query_keys, candidates, candidate_keys, candidate_valid):
    """Ranks of one block of queries against all candidates (the whole computation is this)."""
    scores = jnp.dot(queries, candidates.T, precision=jax.lax.Precision.HIGHEST)
    positive = candidate_keys[None, :] == query_keys[:, None]
    negative = ~positive
    if candidate_valid is not None:  # padding candidates are neither correct nor ahead
        positive = positive & candidate_valid[None, :]
        negative = negative & candidate_valid[None, :]
    best_positive = jnp.max(jnp.where(positive, scores, -jnp.inf), axis=1)
    # Pessimistic ranking: every wrong candidate not strictly below the best correct one is ahead
    # of it (ties, and NaN on either side, count against the model).
    ahead = negative & ~(scores < best_positive[:, None])
    return jnp.sum(ahead, axis=1, dtype=jnp.int32)


def _local_ranks(queries, query_keys, candidates, candidate_keys, candidate_valid, *, block_size):
    n = queries.shape[0]
    block = min(block_size, n)
    blocks = -(-n // block)
    # The last block is shifted back to end at row n instead of being padded: it recomputes a few
    # ranks (to the same values) rather than copying every query into a padded array.
    starts = jnp.minimum(jnp.arange(blocks) * block, n - block)

    def block_ranks(start):
        q = jax.lax.dynamic_slice_in_dim(queries, start, block)
        k = jax.lax.dynamic_slice_in_dim(query_keys, start, block)
        return _block_ranks(q, k, candidates, candidate_keys, candidate_valid)

    ranks = jax.lax.map(block_ranks, starts)
    which = jnp.minimum(jnp.arange(n) // block, blocks - 1)
    return ranks[which, jnp.arange(n) - starts[which]]


def _axis_names(mesh: Mesh, axis: AxisSpec) -> tuple[str, ...]:
    if axis is None:
        return tuple(mesh.axis_names)
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"axis {unknown} not in the mesh's axes {mesh.axis_names}")
    return names


def _pad_rows(x, rows: int, value):
    if rows == x.shape[0]:
        return x
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=value)


def _replicate_if_sharded(x):
    # Inputs sharded over explicit mesh axes carry their sharding in their type, and the blocks'
    # dynamic slices cannot cut a sharded dimension: without a mesh argument, gather them.
    sharding = jax.typeof(x).sharding
    if any(part is not None for part in sharding.spec):
        return jax.reshard(x, NamedSharding(sharding.mesh, P()))
    return x


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "block_size"))
def _ranks(queries, query_keys, candidates, candidate_keys, *, mesh, axis, block_size):
    num_queries, num_candidates = queries.shape[0], candidates.shape[0]
    queries = queries.astype(jnp.float32)
    candidates = candidates.astype(jnp.float32)
    query_keys = query_keys.astype(jnp.int32)
    candidate_keys = candidate_keys.astype(jnp.int32)
    if mesh is None:
        inputs = [_replicate_if_sharded(x) for x in (queries, query_keys, candidates, candidate_keys)]
        return _local_ranks(*inputs, None, block_size=block_size)

    shards = int(np.prod([mesh.shape[a] for a in axis]))
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = all(axis_types[a] == jax.sharding.AxisType.Explicit for a in axis)

    def reshard(x, spec):
        # Explicit axes (jax.make_mesh's default) type-check shardings: shard_map wants inputs that
        # already carry its in_specs, and a sharded dimension cannot be padded or sliced unevenly.
        # With auto axes the compiler places the data itself.
        return jax.reshard(x, NamedSharding(mesh, spec)) if explicit else x

    def pad_to_shards(x, value):
        rows = shards * -(-x.shape[0] // shards)
        if rows == x.shape[0]:
            return x
        # Only sizes that do not divide the device count get here, and those cannot arrive evenly
        # sharded: replicate, then pad.
        return _pad_rows(reshard(x, P()), rows, value)

    # Padded queries (key -2, matching nothing) are cut off at the end; padded candidates (key -1)
    # get -inf scores, so neither changes the rank of a real query.
    candidate_valid = pad_to_shards(jnp.ones(num_candidates, bool), False)
    inputs = (
        pad_to_shards(queries, 0),
        pad_to_shards(query_keys, -2),
        pad_to_shards(candidates, 0),
        pad_to_shards(candidate_keys, -1),
        candidate_valid,
    )

    def shard_ranks(q, qk, c, ck, cv):
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
        return _local_ranks(q, qk, gather(c), gather(ck), gather(cv), block_size=block_size)

    inputs = [reshard(x, P(axis)) for x in inputs]
    ranks = jax.shard_map(shard_ranks, mesh=mesh, in_specs=(P(axis),) * 5, out_specs=P(axis))(*inputs)
    if ranks.shape[0] != num_queries:
        ranks = reshard(ranks, P())[:num_queries]
    return ranks


def ranks_against(
    queries,
    query_keys,
    candidates,
    candidate_keys,
    *,
    mesh: Optional[Mesh] = None,
    axis: AxisSpec = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """For each query, the number of wrong candidates scoring at least as high as its best correct
    candidate (ties count against the query; see the module docstring).

    Args:
      queries: (Q, D) embeddings. candidates: (M, D) embeddings. The score is the dot product.
      query_keys: (Q,) ints; candidate ``j`` is correct for query ``i`` when
        ``candidate_keys[j] == query_keys[i]``. A query with no correct candidate gets rank M.
      candidate_keys: (M,) ints.
      mesh: when given, queries are split over ``axis`` of the mesh (all its axes when ``axis`` is
        None) with ``jax.shard_map`` and candidates all-gathered; sizes need not divide evenly.
        Without one, every device scores everything (sharded inputs are gathered).
      block_size: queries scored at once per device; temporaries are about ``3 * block_size * M``
        floats.

    Returns (Q,) int32 ranks (0 = best). Jit-compatible; inputs may be sharded arrays.
    """
    names = None if mesh is None else _axis_names(mesh, axis)
    return _ranks(
        jnp.asarray(queries),
        jnp.asarray(query_keys),
        jnp.asarray(candidates),
        jnp.asarray(candidate_keys),
        mesh=mesh,
        axis=names,
        block_size=int(block_size),
    )


def _check_ids(ids: np.ndarray, count: int, what: str, owner: str) -> None:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= count))
    if bad.size:
        raise ValueError(
            f"{what}[{bad[0]}] = {ids[bad[0]]} is not a valid index into {count} {owner} "
            f"({bad.size} such entries)"
        )


def _check_matrix(x, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (count, D) array, got shape {tuple(x.shape)}")


def retrieval_ranks(
    image_embeds,
    text_embeds,
    text_image_ids,
    *,
    mesh: Optional[Mesh] = None,
    axis: AxisSpec = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Per-query ranks for text->image and image->text retrieval.

    Args:
      image_embeds: (N_img, D) L2-normalised image embeddings.
      text_embeds: (N_txt, D) L2-normalised caption embeddings.
      text_image_ids: (N_txt,) index of each caption's image (several captions per image allowed).
      mesh, axis, block_size: see ``ranks_against``.

    Returns ``(t2i, i2t)``: (N_txt,) and (N_img,) int32, the number of other images scoring at
    least as high as each caption's image, and the number of other images' captions scoring at
    least as high as each image's best caption (ties count against the model).
    """
    text_image_ids = jnp.asarray(text_image_ids)
    kw = dict(mesh=mesh, axis=axis, block_size=block_size)
    num_images = jnp.shape(image_embeds)[0]
    t2i = ranks_against(text_embeds, text_image_ids, image_embeds, jnp.arange(num_images), **kw)
    i2t = ranks_against(image_embeds, jnp.arange(num_images), text_embeds, text_image_ids, **kw)
    return t2i, i2t


def _percent_below(ranks: np.ndarray, k: int) -> float:
    return 100.0 * int(np.count_nonzero(ranks < k)) / ranks.size


def retrieval_metrics(
    image_embeds,
    text_embeds,
    text_image_ids,
    *,
    mesh: Optional[Mesh] = None,
    axis: AxisSpec = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, float]:
    """Recall@{1,5,10} both ways and their mean, as percentages (the CLIP/ALIGN/AltCLIP tables).

    ``t2i_rK``: share of captions whose image is among their top K images. ``i2t_rK``: share of
    images with at least one of their captions among their top K captions. ``mr``: the mean of the
    six. Ties count against the model: an image tied with the correct one is ranked above it, so a
    collapsed model (every caption embedded alike) scores 0 at R@1 (see the module docstring). Every image must have at
    least one caption, otherwise its image->text recall is undefined and a ValueError is raised.

    Args: as ``retrieval_ranks``; ``mesh`` splits the work over devices with identical results.
    """
    image_embeds, text_embeds = jnp.asarray(image_embeds), jnp.asarray(text_embeds)
    _check_matrix(image_embeds, "image_embeds")
    _check_matrix(text_embeds, "text_embeds")
    if text_embeds.shape[1] != image_embeds.shape[1]:
        raise ValueError(f"embedding sizes differ: images {image_embeds.shape[1]}, texts {text_embeds.shape[1]}")
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    ids = np.asarray(text_image_ids)
    if ids.shape != (num_texts,):
        raise ValueError(f"text_image_ids has shape {ids.shape}, expected ({num_texts},), one per caption")
    _check_ids(ids, num_images, "text_image_ids", "images")
    captionless = np.flatnonzero(np.bincount(ids, minlength=num_images) == 0)
    if captionless.size:
        raise ValueError(
            f"{captionless.size} of {num_images} images have no caption (first: image {captionless[0]}); "
            "image->text recall is undefined for them"
        )
    t2i, i2t = retrieval_ranks(image_embeds, text_embeds, ids, mesh=mesh, axis=axis, block_size=block_size)
    t2i, i2t = np.asarray(t2i), np.asarray(i2t)
    metrics = {f"t2i_r{k}": _percent_below(t2i, k) for k in RECALL_KS}
    metrics.update({f"i2t_r{k}": _percent_below(i2t, k) for k in RECALL_KS})
    metrics["mr"] = float(np.mean(list(metrics.values())))
    return metrics


def zeroshot_metrics(
    image_embeds,
    classifier,
    labels,
    *,
    mesh: Optional[Mesh] = None,
    axis: AxisSpec = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, float]:
    """Zero-shot top-1, top-5 and mean per-class recall, as percentages.

    Args:
      image_embeds: (N, D) L2-normalised image embeddings.
      classifier: (C, D) class embeddings (``zeroshot_classifier``).
      labels: (N,) true class of each image.
      mesh, axis, block_size: see ``ranks_against``.

    The logit scale (CLIP's 100, ALIGN's 1/temperature) multiplies every score of an image by the
    same positive number, which leaves every rank and hence every metric unchanged, so it is not an
    argument. ``top5`` uses the top ``min(5, C)`` classes (100% when C <= 5; clip_benchmark reports
    NaN there). ``mean_per_class_recall`` is the top-1 accuracy averaged over the classes that occur
    in ``labels`` (sklearn's ``balanced_accuracy_score``, as clip_benchmark reports it). Ties
    count against the model, as for retrieval: a class scoring exactly as high as the true one is
    ranked above it, so a model that embeds every prompt alike scores 0 top-1 (not 100).
    """
    image_embeds, classifier = jnp.asarray(image_embeds), jnp.asarray(classifier)
    _check_matrix(image_embeds, "image_embeds")
    _check_matrix(classifier, "classifier")
    if classifier.shape[1] != image_embeds.shape[1]:
        raise ValueError(f"embedding sizes differ: images {image_embeds.shape[1]}, classifier {classifier.shape[1]}")
    num_classes = classifier.shape[0]
    labels = np.asarray(labels)
    if labels.shape != (image_embeds.shape[0],):
        raise ValueError(f"labels has shape {labels.shape}, expected ({image_embeds.shape[0]},), one per image")
    _check_ids(labels, num_classes, "labels", "classes")
    ranks = np.asarray(
        ranks_against(image_embeds, labels, classifier, jnp.arange(num_classes), mesh=mesh, axis=axis, block_size=block_size)
    )
    correct = ranks == 0
    present = np.unique(labels)
    per_class = [np.count_nonzero(correct[labels == c]) / np.count_nonzero(labels == c) for c in present]
    return {
        "top1": _percent_below(ranks, 1),
        "top5": _percent_below(ranks, min(5, num_classes)),
        "mean_per_class_recall": float(100.0 * np.mean(per_class)),
    }
