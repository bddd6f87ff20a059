"""Retrieval recall and zero-shot metrics against brute-force references and hand-computed cases.

Tolerances: ranks and recall percentages must agree exactly (they are counts); only the zero-shot
classifier (a float32 mean of normalised vectors) is compared with atol 1e-6.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from sklearn.metrics import balanced_accuracy_score

from altjax.evaluation import (
    CHINESE_TEMPLATES,
    ENGLISH_TEMPLATES,
    OPENAI_IMAGENET_SELECTED_TEMPLATES,
    OPENAI_IMAGENET_TEMPLATES,
    fill_template,
    get_templates,
    load_templates,
    ranks_against,
    retrieval_metrics,
    retrieval_ranks,
    zeroshot_classifier,
    zeroshot_metrics,
)
from tests.helpers import assert_close

KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")


# ---------------------------------------------------------------- references and data


def argsort_reference(image_embeds, text_embeds, ids):
    """Ranks by sorting every score row with np.argsort, looping over queries (no shared code)."""
    scores = np.asarray(text_embeds, np.float64) @ np.asarray(image_embeds, np.float64).T
    t2i = []
    for t in range(scores.shape[0]):
        order = list(np.argsort(-scores[t], kind="stable"))
        t2i.append(order.index(ids[t]))
    i2t = []
    for i in range(scores.shape[1]):
        order = np.argsort(-scores[:, i], kind="stable")
        i2t.append(min(p for p, t in enumerate(order) if ids[t] == i))
    return np.array(t2i), np.array(i2t)


def counting_reference(image_embeds, text_embeds, ids):
    """Ranks under the documented tie rule (pessimistic): the wrong candidates scoring at least as
    high as the best correct one."""
    scores = np.asarray(text_embeds, np.float64) @ np.asarray(image_embeds, np.float64).T
    t2i = [sum(s >= scores[t, ids[t]] for i, s in enumerate(scores[t]) if i != ids[t])
           for t in range(scores.shape[0])]
    i2t = []
    for i in range(scores.shape[1]):
        best = max(scores[t, i] for t in range(scores.shape[0]) if ids[t] == i)
        i2t.append(sum(s >= best for t, s in enumerate(scores[:, i]) if ids[t] != i))
    return np.array(t2i), np.array(i2t)


def recalls_from_ranks(t2i, i2t):
    out = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["mr"] = sum(out[k] for k in KEYS) / 6
    return out


def caption_ids(rng, num_images):
    """1 to 5 captions per image, in shuffled order (as a dataset would list them)."""
    counts = rng.integers(1, 6, num_images)
    return rng.permutation(np.repeat(np.arange(num_images), counts))


def dyadic_embeds(rng, rows, dim, levels=512):
    # Entries k/levels with |k| <= levels <= 512: the products' numerators are at most 2**18, so
    # sums over up to 64 dimensions stay below 2**24 and every dot product is exact in float32 and
    # float64 in any summation order. The JAX ranks and the float64 reference then see the very
    # same scores, and exact agreement is a property rather than luck.
    return (rng.integers(-levels, levels + 1, (rows, dim)) / levels).astype(np.float32)


def unit_embeds(rng, rows, dim):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_metrics_equal(actual, expected, what):
    assert set(actual) == set(KEYS) | {"mr"}, f"{what}: keys {sorted(actual)}"
    for key in KEYS + ("mr",):
        assert abs(actual[key] - expected[key]) <= 1e-9, f"{what}: {key} = {actual[key]} != {expected[key]}"


def assert_ranks_equal(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = np.flatnonzero(actual != expected)
    assert bad.size == 0, (
        f"{what}: {bad.size} ranks differ, first at {bad[0]}: {actual[bad[0]]} != {expected[bad[0]]}"
    )


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize(
    "num_images, dim, block_size, seed",
    [(1, 8, 512, 0), (37, 16, 512, 1), (37, 16, 7, 2), (120, 12, 64, 3)],
)
def test_retrieval_matches_argsort_reference(num_images, dim, block_size, seed):
    rng = np.random.default_rng(seed)
    ids = caption_ids(rng, num_images)
    images, texts = dyadic_embeds(rng, num_images, dim), dyadic_embeds(rng, len(ids), dim)
    scores = texts.astype(np.float64) @ images.astype(np.float64).T
    # The argsort reference breaks ties by position, so this data must have none that matter.
    for t in range(len(ids)):
        tied = np.flatnonzero(scores[t] == scores[t, ids[t]])
        assert list(tied) == [ids[t]], f"seed {seed}: caption {t} ties with images {tied}"
    for i in range(num_images):
        best = scores[ids == i, i].max()
        tied = np.flatnonzero(scores[:, i] == best)
        assert all(ids[tied] == i) or len(tied) == 1, f"seed {seed}: image {i} ties with captions {tied}"

    t2i_ref, i2t_ref = argsort_reference(images, texts, ids)
    t2i, i2t = retrieval_ranks(images, texts, ids, block_size=block_size)
    assert_ranks_equal(t2i, t2i_ref, "text->image ranks vs argsort")
    assert_ranks_equal(i2t, i2t_ref, "image->text ranks vs argsort")
    metrics = retrieval_metrics(images, texts, ids, block_size=block_size)
    assert_metrics_equal(metrics, recalls_from_ranks(t2i_ref, i2t_ref), "metrics vs argsort reference")


def test_retrieval_hand_case_three_images_five_captions():
    # image_embeds = identity, so the score of (caption t, image i) is text_embeds[t, i].
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # image 0: rank 0
            [0.3, 0.5, 0.4],  # image 0: rank 2
            [0.6, 0.2, 0.7],  # image 1: rank 2
            [0.1, 0.8, 0.5],  # image 2: rank 1
            [0.2, 0.3, 0.25],  # image 2: rank 1
        ],
        np.float32,
    )
    ids = np.array([0, 0, 1, 2, 2])
    # Image columns: image 0's best caption 0.9 is first; image 1's only caption (0.2) has 0.5, 0.8,
    # 0.3 above it (rank 3); image 2's best caption (0.5) has 0.7 above it (rank 1).
    expected = {
        "t2i_r1": 20.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "i2t_r1": 100 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0,
    }
    expected["mr"] = (20 + 100 + 100 + 100 / 3 + 100 + 100) / 6
    t2i, i2t = retrieval_ranks(np.eye(3, dtype=np.float32), scores, ids)
    assert_ranks_equal(t2i, [0, 2, 2, 1, 1], "hand case text->image ranks")
    assert_ranks_equal(i2t, [0, 3, 1], "hand case image->text ranks")
    assert_metrics_equal(retrieval_metrics(np.eye(3, dtype=np.float32), scores, ids), expected, "hand case")


def score_row(size, positives, positive_scores, higher, tied=0):
    """A score row: the given positives, ``higher`` others at 0.75, ``tied`` others exactly at the
    best positive score, the rest at 0.0625."""
    row = np.full(size, 0.0625, np.float32)
    row[positives] = positive_scores
    others = [j for j in range(size) if j not in positives]
    row[others[:higher]] = 0.75
    row[others[higher : higher + tied]] = max(positive_scores)
    return row


def test_retrieval_hand_case_text_to_image_boundaries():
    # 12 images, 9 captions; caption t belongs to image t and has ranks[t] images above it; the last
    # caption ties with 3 images and no image is above it: rank 3 under the (pessimistic) tie rule.
    ranks = [0, 0, 1, 4, 5, 9, 10, 11]
    texts = np.stack(
        [score_row(12, [t], [0.5], r) for t, r in enumerate(ranks)] + [score_row(12, [8], [0.5], 0, tied=3)]
    )
    ids = np.arange(9)
    t2i, _ = retrieval_ranks(np.eye(12, dtype=np.float32), texts, ids)
    assert_ranks_equal(t2i, ranks + [3], "text->image boundary ranks")
    # retrieval_metrics needs every image captioned: images 9-11 get one caption each, rank 0.
    texts = np.concatenate([texts, np.eye(12, dtype=np.float32)[9:]])
    ids = np.arange(12)
    metrics = retrieval_metrics(np.eye(12, dtype=np.float32), texts, ids)
    # ranks 0,0,1,4,5,9,10,11,3,0,0,0: R@1 5/12, R@5 8/12 (adds 1, 4 and 3), R@10 10/12 (adds 5, 9).
    for key, value in (("t2i_r1", 500 / 12), ("t2i_r5", 800 / 12), ("t2i_r10", 1000 / 12)):
        assert abs(metrics[key] - value) <= 1e-9, f"{key} = {metrics[key]}, expected {value}"


def test_retrieval_hand_case_image_to_text_any_caption():
    # Texts are the identity, so the score of (image i, text t) is image_embeds[i, t]. 15 texts:
    # image 0 owns texts 0-2, image 1 texts 3-7, image 2 texts 8-9, image 3 texts 10-14.
    ids = np.array([0] * 3 + [1] * 5 + [2] * 2 + [3] * 5)
    images = np.stack(
        [
            score_row(15, [0, 1, 2], [0.25, 0.5, 0.125], 2),  # best caption 0.5, 2 above: rank 2
            score_row(15, [3, 4, 5, 6, 7], [0.5, 0.25, 0.25, 0.25, 0.25], 5),  # rank 5
            score_row(15, [8, 9], [0.5, 0.25], 0, tied=2),  # best caption tied with 2 others: rank 2
            score_row(15, [10, 11, 12, 13, 14], [0.5] * 5, 10),  # every caption below 10 texts
        ]
    )
    _, i2t = retrieval_ranks(images, np.eye(15, dtype=np.float32), ids)
    assert_ranks_equal(i2t, [2, 5, 2, 10], "image->text ranks")
    metrics = retrieval_metrics(images, np.eye(15, dtype=np.float32), ids)
    for key, value in (("i2t_r1", 0.0), ("i2t_r5", 50.0), ("i2t_r10", 75.0)):
        assert abs(metrics[key] - value) <= 1e-9, f"{key} = {metrics[key]}, expected {value}"


@functools.lru_cache(maxsize=None)
def uneven_case():
    """37 images with 1-5 captions each (sizes that do not divide 8): random unit embeddings, and
    entries in {-1, 0, 1} whose integer scores tie all the time. One shape, so one compilation."""
    rng = np.random.default_rng(11)
    ids = caption_ids(rng, 37)
    unit = unit_embeds(rng, 37, 32), unit_embeds(rng, len(ids), 32)
    tied = dyadic_embeds(rng, 37, 32, levels=1), dyadic_embeds(rng, len(ids), 32, levels=1)
    return ids, unit, tied


def test_retrieval_ties_follow_the_documented_rule():
    ids, _, (images, texts) = uneven_case()
    t2i_ref, i2t_ref = counting_reference(images, texts, ids)
    t2i, i2t = retrieval_ranks(images, texts, ids)
    assert_ranks_equal(t2i, t2i_ref, "tied text->image ranks")
    assert_ranks_equal(i2t, i2t_ref, "tied image->text ranks")


def meshes():
    return {
        "8 explicit": (jax.make_mesh((8,), ("batch",)), None),
        "8 auto": (jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,)), None),
        "4x2, data only": (jax.make_mesh((4, 2), ("data", "model")), "data"),
        "4x2, both axes": (jax.make_mesh((4, 2), ("data", "model")), ("data", "model")),
    }


@pytest.mark.parametrize("mesh_name", list(meshes()))
def test_retrieval_sharded_equals_single_device(mesh_name):
    mesh, axis = meshes()[mesh_name]
    ids, (images, texts), (tie_images, tie_texts) = uneven_case()
    single = retrieval_ranks(images, texts, ids)
    sharded = retrieval_ranks(images, texts, ids, mesh=mesh, axis=axis, block_size=3)
    for name, a, b in zip(("t2i", "i2t"), sharded, single):
        assert_ranks_equal(a, b, f"{mesh_name}: sharded {name} ranks vs single device")
    # With ties the sharded computation must still follow the pessimistic tie rule exactly.
    for name, a, b in zip(
        ("t2i", "i2t"),
        retrieval_ranks(tie_images, tie_texts, ids, mesh=mesh, axis=axis, block_size=3),
        counting_reference(tie_images, tie_texts, ids),
    ):
        assert_ranks_equal(a, b, f"{mesh_name}: sharded tied {name} ranks vs counting reference")


def test_retrieval_under_jit_on_sharded_embeddings():
    mesh = jax.make_mesh((8,), ("batch",))
    rng = np.random.default_rng(12)
    ids = np.repeat(np.arange(40), 3)  # 40 images, 120 captions: both divide 8
    images, texts = unit_embeds(rng, 40, 16), unit_embeds(rng, 120, 16)
    shard = NamedSharding(mesh, P("batch"))
    sharded_args = [jax.device_put(x, shard) for x in (images, texts, ids)]
    ranks = jax.jit(lambda i, t, d: retrieval_ranks(i, t, d, mesh=mesh, block_size=4))(*sharded_args)
    for name, a, b in zip(("t2i", "i2t"), ranks, retrieval_ranks(images, texts, ids)):
        assert_ranks_equal(a, b, f"jit on sharded inputs: {name}")
    single_metrics = retrieval_metrics(images, texts, ids)
    sharded_metrics = retrieval_metrics(*sharded_args, mesh=mesh)
    assert sharded_metrics == single_metrics, f"sharded {sharded_metrics} != single device {single_metrics}"
    # Without a mesh argument, sharded inputs are gathered and scored as one.
    gathered_metrics = retrieval_metrics(*sharded_args, block_size=7)
    assert gathered_metrics == single_metrics, f"mesh=None on sharded {gathered_metrics} != {single_metrics}"


def test_retrieval_memory_is_bounded_by_the_block():
    # Compile only (nothing runs): 25k images x 125k captions at D = 640, and twice the queries.
    # XLA's temporaries must stay near 3 score blocks (block x candidates) and not grow with the
    # number of queries; a full 25k x 125k score matrix would be 11.6 GiB.
    def temp_bytes(num_queries, num_candidates, block):
        spec = jax.ShapeDtypeStruct
        lowered = jax.jit(functools.partial(ranks_against, block_size=block)).lower(
            spec((num_queries, 640), jnp.float32), spec((num_queries,), jnp.int32),
            spec((num_candidates, 640), jnp.float32), spec((num_candidates,), jnp.int32),
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    for queries, candidates in ((25_000, 125_000), (50_000, 125_000), (125_000, 25_000)):
        block_bytes = 256 * candidates * 4
        measured = temp_bytes(queries, candidates, 256)
        assert measured <= 3.5 * block_bytes, (
            f"{queries} queries x {candidates} candidates: temporaries {measured / 2**20:.0f} MiB > "
            f"3.5 score blocks ({3.5 * block_bytes / 2**20:.0f} MiB)"
        )


def test_retrieval_bfloat16_embeddings_are_upcast():
    ids, unit, _ = uneven_case()
    images, texts = (jnp.asarray(x, jnp.bfloat16) for x in unit)
    expected = retrieval_metrics(images.astype(jnp.float32), texts.astype(jnp.float32), ids)
    assert retrieval_metrics(images, texts, ids) == expected, "bf16 inputs differ from their fp32 upcast"


def test_ties_count_against_the_model():
    # One query, four candidates; the correct one (0) ties exactly with candidate 2: rank 1, so a
    # miss at K=1 and a hit at K=2. With the tie broken upwards it is rank 0 (a hit) as before.
    candidates = np.eye(4, dtype=np.float32)
    tied = np.array([[0.5, 0.25, 0.5, 0.125]], np.float32)
    rank = int(ranks_against(tied, [0], candidates, np.arange(4))[0])
    assert rank == 1, f"a tie with one other candidate gave rank {rank}, expected 1 (miss at K=1, hit at K=2)"
    assert not rank < 1 and rank < 2
    clear = np.array([[0.5, 0.25, 0.375, 0.125]], np.float32)
    assert int(ranks_against(clear, [0], candidates, np.arange(4))[0]) == 0, "an untied best candidate is not rank 0"
    # Other correct candidates never count against the query (image->text with several captions).
    rank = int(ranks_against(tied, [0], candidates, np.array([0, 1, 0, 2]))[0])
    assert rank == 0, f"a tie with another correct caption gave rank {rank}, expected 0"
    # NaN scores (broken embeddings) count against the model too.
    nan = np.array([[np.nan, 0.25, 0.5, 0.125]], np.float32)
    rank = int(ranks_against(nan, [0], candidates, np.arange(4))[0])
    assert rank == 3, f"a NaN correct score gave rank {rank}, expected 3 (last)"


def test_collapsed_model_scores_zero():
    # A model that embeds everything alike: every score equal. The old "ties in the query's
    # favour" rule gave it 100% everywhere; it must score 0 at every K below the candidate count.
    rng = np.random.default_rng(5)
    same = np.tile(unit_embeds(rng, 1, 16), (12, 1))
    ids = np.arange(12)
    metrics = retrieval_metrics(same, same, ids)
    assert all(metrics[k] == 0.0 for k in KEYS + ("mr",)), f"collapsed retrieval metrics {metrics}"
    # Only the texts collapsed (images distinct): image->text is 0 at every K.
    metrics = retrieval_metrics(unit_embeds(rng, 12, 16), same, ids)
    assert all(metrics[f"i2t_r{k}"] == 0.0 for k in (1, 5, 10)), f"collapsed texts, image->text {metrics}"
    # Zero-shot: every class prompt embedded alike -> 0 top-1 and 0 top-5 with 10 classes.
    images, labels = unit_embeds(rng, 30, 16), rng.integers(0, 10, 30)
    metrics = zeroshot_metrics(images, np.tile(same[:1], (10, 1)), labels)
    assert metrics == {"top1": 0.0, "top5": 0.0, "mean_per_class_recall": 0.0}, f"collapsed zero-shot {metrics}"
    # A normal model on the same data is unchanged by the rule (no ties): the argsort reference.
    classifier = unit_embeds(rng, 10, 16)
    predicted = np.argmax(images @ classifier.T, axis=1)
    top1 = zeroshot_metrics(images, classifier, labels)["top1"]
    assert abs(top1 - 100 * np.mean(predicted == labels)) <= 1e-9, f"normal top1 {top1}"


def test_retrieval_input_errors():
    images, texts = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"text_image_ids\[2\] = 3 is not a valid index into 3 images"):
        retrieval_metrics(images, texts, [0, 1, 3])
    with pytest.raises(ValueError, match="1 of 3 images have no caption .first: image 2"):
        retrieval_metrics(images, texts, [0, 1, 1])
    with pytest.raises(ValueError, match=r"expected \(3,\), one per caption"):
        retrieval_metrics(images, texts, [0, 1])
    with pytest.raises(ValueError, match="embedding sizes differ"):
        retrieval_metrics(images, texts[:, :2], [0, 1, 2])


# ---------------------------------------------------------------- zero-shot


def class_scores(num_classes, label, rank, tied=False):
    """An image whose score row (classifier = identity) puts ``rank`` classes above its label;
    ``tied`` adds one class with exactly the label's score (ranked above the label: a miss at top-1)."""
    row = np.full(num_classes, 0.25, np.float32)
    row[label] = 0.5
    others = [c for c in range(num_classes) if c != label]
    row[others[:rank]] = 0.75
    if tied:
        row[[c for c in others[rank:] if c > label][0]] = 0.5
    return row


def test_zeroshot_metrics_constructed_case():
    # 7 classes (class 4 has no images); (label, rank, tied) for 14 images.
    images_spec = (
        [(0, 0, False)] * 3
        + [(1, 0, False), (1, 1, False)]
        + [(2, 0, False), (2, 0, False), (2, 4, False), (2, 5, False)]
        + [(3, 6, False)]
        + [(5, 0, True), (5, 2, False)]  # the tie makes the first a rank-1 miss
        + [(6, 0, False)] * 2
    )
    labels = np.array([s[0] for s in images_spec])
    images = np.stack([class_scores(7, *s) for s in images_spec])
    classifier = np.eye(7, dtype=np.float32)
    expected = {
        "top1": 100 * 8 / 14,  # rank 0: 3 + 1 + 2 + 0 + 0 + 2
        "top5": 100 * 12 / 14,  # all but ranks 5 and 6
        "mean_per_class_recall": 100 * (1 + 1 / 2 + 2 / 4 + 0 + 0 + 1) / 6,  # 6 classes present
    }
    metrics = zeroshot_metrics(images, classifier, labels)
    assert set(metrics) == set(expected), f"keys {sorted(metrics)}"
    for key, value in expected.items():
        assert abs(metrics[key] - value) <= 1e-9, f"{key} = {metrics[key]}, expected {value}"
    # sklearn's reference sees argmax predictions with ties broken against the label (as the rule says).
    scores = images @ classifier.T
    scores[np.arange(len(labels)), labels] -= 1e-3
    sklearn_value = 100 * balanced_accuracy_score(labels, np.argmax(scores, axis=1))
    assert abs(metrics["mean_per_class_recall"] - sklearn_value) <= 1e-9, (
        f"mean_per_class_recall {metrics['mean_per_class_recall']} != sklearn balanced accuracy {sklearn_value}"
    )
    # The logit scale multiplies every score: no metric may change. Neither may sharding.
    assert zeroshot_metrics(images, 100.0 * classifier, labels) == metrics, "logit scale changed the metrics"
    mesh = jax.make_mesh((8,), ("batch",))
    assert zeroshot_metrics(images, classifier, labels, mesh=mesh, block_size=1) == metrics, "sharded differs"


def test_zeroshot_fewer_than_five_classes_and_errors():
    images = np.stack([class_scores(3, 0, 2), class_scores(3, 1, 0), class_scores(3, 2, 1)])
    metrics = zeroshot_metrics(images, np.eye(3, dtype=np.float32), [0, 1, 2])
    assert metrics["top5"] == 100.0, f"top5 with 3 classes is over min(5, C) = 3 classes: got {metrics['top5']}"
    assert abs(metrics["top1"] - 100 / 3) <= 1e-9, f"top1 {metrics['top1']}"
    with pytest.raises(ValueError, match=r"labels\[1\] = 3 is not a valid index into 3 classes"):
        zeroshot_metrics(images, np.eye(3, dtype=np.float32), [0, 3, 1])
    with pytest.raises(ValueError, match="one per image"):
        zeroshot_metrics(images, np.eye(3, dtype=np.float32), [0, 1])


def test_zeroshot_classifier_averages_normalised_template_embeddings():
    table = {
        "a photo of a cat.": [3.0, 4.0, 0.0],
        "a drawing of a cat.": [0.0, 0.0, 2.0],
        "a photo of a dog.": [1.0, 0.0, 0.0],
        "a drawing of a dog.": [5.0, 0.0, 0.0],
    }
    calls = []

    def encode_text(prompts):
        calls.append(list(prompts))
        return jnp.asarray([table[p] for p in prompts])

    classifier = zeroshot_classifier(encode_text, ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."])
    assert calls == [
        ["a photo of a cat.", "a drawing of a cat."],
        ["a photo of a dog.", "a drawing of a dog."],
    ], f"encode_text calls {calls}"
    # cat: mean of (0.6, 0.8, 0) and (0, 0, 1) is (0.3, 0.4, 0.5), of norm sqrt(0.5).
    expected = np.array([[0.3, 0.4, 0.5], [1.0, 0.0, 0.0]]) / np.array([[np.sqrt(0.5)], [1.0]])
    assert classifier.dtype == jnp.float32, f"classifier dtype {classifier.dtype}"
    assert_close(classifier, expected, atol=1e-6, what="zero-shot classifier vs hand computation")
    with pytest.raises(ValueError, match="template 1 'a drawing' has no '{}' placeholder"):
        zeroshot_classifier(encode_text, ["cat"], ["a photo of a {}.", "a drawing"])


# ---------------------------------------------------------------- templates


def test_builtin_templates():
    sets = {
        "OPENAI_IMAGENET_TEMPLATES": OPENAI_IMAGENET_TEMPLATES,
        "OPENAI_IMAGENET_SELECTED_TEMPLATES": OPENAI_IMAGENET_SELECTED_TEMPLATES,
        "ENGLISH_TEMPLATES": ENGLISH_TEMPLATES,
        "CHINESE_TEMPLATES": CHINESE_TEMPLATES,
    }
    for name, templates in sets.items():
        assert len(set(templates)) == len(templates), f"{name} has duplicates"
        assert all(t.count("{}") == 1 for t in templates), f"{name}: a template without exactly one {{}}"
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80, f"{len(OPENAI_IMAGENET_TEMPLATES)} OpenAI templates, expected 80"
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[35] == "a {} in a video game."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(OPENAI_IMAGENET_SELECTED_TEMPLATES) == 7
    assert set(OPENAI_IMAGENET_SELECTED_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert CHINESE_TEMPLATES[0] == "一张{}的照片。"
    assert fill_template("一张{}的照片。", "猫") == "一张猫的照片。"
    assert fill_template("{a} photo of a {}.", "cat") == "{a} photo of a cat."
    assert get_templates("zh") == CHINESE_TEMPLATES and get_templates("openai_imagenet") == OPENAI_IMAGENET_TEMPLATES


def test_load_templates_formats_and_errors(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# my prompts\n\na photo of a {}.\n  一张{}的照片。  \n", encoding="utf-8")
    assert load_templates(text) == ("a photo of a {}.", "一张{}的照片。")
    assert get_templates(str(text)) == ("a photo of a {}.", "一张{}的照片。")

    as_json = tmp_path / "prompts.json"
    as_json.write_text(json.dumps(["a {}.", "the {}."]), encoding="utf-8")
    assert load_templates(as_json) == ("a {}.", "the {}.")
    untyped = tmp_path / "prompts.lst"
    untyped.write_text(' ["a {}."]', encoding="utf-8")
    assert load_templates(untyped) == ("a {}.",)

    bad_line = tmp_path / "bad.txt"
    bad_line.write_text("a photo of a {}.\n\na photo of a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: template 'a photo of a cat' has no '\{\}'"):
        load_templates(bad_line)
    bad_entry = tmp_path / "bad.json"
    bad_entry.write_text(json.dumps(["a {}.", "a cat"]), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: template 1 'a cat' has no"):
        load_templates(bad_entry)
    not_list = tmp_path / "obj.json"
    not_list.write_text(json.dumps({"t": "a {}."}), encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list of template strings, got dict"):
        load_templates(not_list)
    broken = tmp_path / "broken.json"
    broken.write_text('["a {}.",', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_templates(broken)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: no templates"):
        load_templates(empty)
    with pytest.raises(ValueError, match="neither a built-in template set"):
        get_templates(str(tmp_path / "missing.txt"))
