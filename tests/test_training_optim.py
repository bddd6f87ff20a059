"""altjax.training.optim with stacked (scanned) layers: LAMB's per-layer trust ratio, the decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altjax import sharding
from altjax.training import optim
from tests.helpers import assert_close, assert_rel_close

NO_DECAY = r"(bias|scale)$"
K = 3  # layers


def flat(tree) -> dict:
    return {sharding.path_to_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("path, axis", [
    ("text_model/encoder/layer/attention/self/query/kernel", 0),                  # BERT, stacked
    ("text_model/roberta/encoder/layers/output/dense/kernel", 0),                 # XLM-R, stacked
    ("vision_model/encoder/layers/mlp/fc1/bias", 0),                              # CLIP, stacked
    ("vision_model/encoder/stages/3/layers/depthwise_conv/kernel", 0),            # EfficientNet, stacked
    ("opt_state/1/0/mu/text_model/encoder/layer/attention/self/query/kernel", 0),  # its Adam moment
    ("text_model/encoder/layer/0/attention/self/query/kernel", None),             # BERT, unrolled
    ("vision_model/encoder/layers/3/mlp/fc1/bias", None),                         # CLIP, unrolled
    ("vision_model/encoder/layers/11/layer_norm1/scale", None),
    ("opt_state/1/0/mu/vision_model/encoder/layers/3/mlp/fc1/bias", None),
    ("vision_model/encoder/stages/3/layers/0/depthwise_conv/kernel", None),
    ("text_projection/kernel", None),
    ("text_model/final_layer_norm/scale", None),
    ("vision_model/pre_layrnorm/bias", None),
    ("layers", None),
])
def test_layer_axis(path, axis):
    assert sharding.layer_axis(path) == axis, f"layer_axis({path!r}) = {sharding.layer_axis(path)}, expected {axis}"
    key_path = tuple(jax.tree_util.DictKey(int(p) if p.isdigit() else p) for p in path.split("/"))
    assert sharding.layer_axis(key_path) == axis, f"layer_axis of the key path of {path!r}"


def unrolled_and_stacked(seed: int = 0):
    """The same parameters twice: K layers under ``encoder/layers/<i>/`` and stacked under
    ``encoder/layers/``, with a projection outside the layers. Each layer has its own scale, so
    the layers' trust ratios differ."""
    rng = np.random.default_rng(seed)
    scales = np.arange(1, K + 1, dtype=np.float32)
    stacked_layer = {
        "mlp": {"fc1": {"kernel": rng.normal(size=(K, 8, 16)).astype(np.float32) * scales[:, None, None],
                        "bias": rng.normal(size=(K, 16)).astype(np.float32) * scales[:, None]}},
        "layer_norm1": {"scale": (1.0 + 0.1 * rng.normal(size=(K, 8))).astype(np.float32)},
    }
    projection = {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}
    stacked = {"vision_model": {"encoder": {"layers": stacked_layer}}, "visual_projection": projection}
    unrolled = {"vision_model": {"encoder": {"layers": {
        i: jax.tree.map(lambda x, i=i: x[i], stacked_layer) for i in range(K)}}}, "visual_projection": projection}
    return jax.tree.map(jnp.asarray, unrolled), jax.tree.map(jnp.asarray, stacked)


def unstack(stacked):
    """The stacked tree's values in the unrolled tree's layout."""
    layer = stacked["vision_model"]["encoder"]["layers"]
    return {"vision_model": {"encoder": {"layers": {i: jax.tree.map(lambda x, i=i: x[i], layer) for i in range(K)}}},
            "visual_projection": stacked["visual_projection"]}


def stacked_gradients(steps: int, seed: int = 1):
    """Per-step gradients in the stacked layout, the layers' magnitudes differing."""
    rng = np.random.default_rng(seed)
    _, stacked = unrolled_and_stacked()
    return [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)
                                               * (1 + rng.integers(0, 5, size=x.shape[:1]).reshape(
                                                   (-1,) + (1,) * (x.ndim - 1)))), stacked)
            for _ in range(steps)]


def run(tx, params, grads):
    """The updates of each step of ``tx`` from ``params`` along ``grads``."""
    state = tx.init(params)
    updates = []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return updates


SETTINGS = dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 5), b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1)


def test_lamb_equals_optax_lamb_without_stacked_layers():
    params, _ = unrolled_and_stacked()
    grads = [unstack(g) for g in stacked_gradients(5)]
    mask = optim.decay_mask(params, NO_DECAY)
    ours = run(optim.lamb(**SETTINGS, mask=mask), params, grads)
    theirs = run(optax.lamb(**SETTINGS, mask=mask), params, grads)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name, value in flat(a).items():
            assert_close(value, flat(b)[name], atol=0.0, what=f"step {step} update of {name} vs optax.lamb")
    # And under jit, as the train step runs it.
    tx, ref = optim.lamb(**SETTINGS, mask=mask), optax.lamb(**SETTINGS, mask=mask)
    a = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads[0], params)
    b = jax.jit(lambda g, p: ref.update(g, ref.init(p), p)[0])(grads[0], params)
    for name, value in flat(a).items():
        assert_close(value, flat(b)[name], atol=0.0, what=f"jitted update of {name} vs optax.lamb")


def test_lamb_on_stacked_layers_equals_lamb_on_unrolled_layers():
    unrolled, stacked = unrolled_and_stacked()
    grads = stacked_gradients(5)
    tx = lambda params: optim.lamb(**SETTINGS, mask=optim.decay_mask(params, NO_DECAY))
    got = run(tx(stacked), stacked, grads)
    want = run(tx(unrolled), unrolled, [unstack(g) for g in grads])
    worst = 0.0
    for step, (a, b) in enumerate(zip(got, want)):
        b = flat(b)
        for name, value in flat(unstack(a)).items():
            worst = max(worst, assert_rel_close(value, b[name], rtol=1e-6,
                                                what=f"step {step}: stacked vs unrolled update of {name}"))
    print(f"stacked vs unrolled LAMB updates, 5 steps: max relative difference {worst:.2e}")

    # optax's one ratio per leaf mixes the layers: the test above can tell the difference.
    plain = run(optax.lamb(**SETTINGS, mask=optim.decay_mask(stacked, NO_DECAY)), stacked, grads)
    kernel = "vision_model/encoder/layers/0/mlp/fc1/kernel"
    a, b = flat(unstack(plain[0]))[kernel], flat(want[0])[kernel]
    diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert diff > 0.1, f"optax.lamb on the stacked tree differs from the unrolled updates by only {diff:.2e}"


def test_layerwise_trust_ratio_keeps_optax_zero_handling():
    """A layer whose parameters or update are zero is scaled by 1, as optax scales such a leaf."""
    tx = optim.scale_by_layerwise_trust_ratio()
    params = {"encoder": {"layers": {"w": jnp.stack([jnp.zeros(4), jnp.full(4, 2.0), jnp.full(4, 3.0)])}}}
    updates = {"encoder": {"layers": {"w": jnp.stack([jnp.ones(4), jnp.ones(4), jnp.zeros(4)])}}}
    got = tx.update(updates, tx.init(params), params)[0]["encoder"]["layers"]["w"]
    want = jnp.stack([jnp.ones(4), jnp.full(4, 2.0), jnp.zeros(4)])  # ratios 1 (zero param), 2, 1 (zero update)
    assert_close(got, want, atol=0.0, what="layerwise trust ratio with zero layers")
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(updates, tx.init(params), None)


def test_decay_mask_ignores_the_layer_axis():
    unrolled, stacked = unrolled_and_stacked()
    mask = flat(optim.decay_mask(stacked, NO_DECAY))
    assert mask == {"vision_model/encoder/layers/mlp/fc1/kernel": True,      # (K, 8, 16)
                    "vision_model/encoder/layers/mlp/fc1/bias": False,       # (K, 16): a bias
                    "vision_model/encoder/layers/layer_norm1/scale": False,  # (K, 8): a norm
                    "visual_projection/kernel": True}, mask
    # Without a no_decay pattern only the number of dimensions decides.
    mask = flat(optim.decay_mask(stacked, ""))
    assert mask["vision_model/encoder/layers/mlp/fc1/bias"] is False, "a stacked 2-D bias decays"
    assert mask["vision_model/encoder/layers/mlp/fc1/kernel"] is True, "a stacked 3-D kernel does not decay"
    mask = flat(optim.decay_mask(unrolled, ""))
    for i in range(K):
        assert mask[f"vision_model/encoder/layers/{i}/mlp/fc1/kernel"] is True, f"unrolled kernel {i}"
        assert mask[f"vision_model/encoder/layers/{i}/mlp/fc1/bias"] is False, f"unrolled bias {i}"
