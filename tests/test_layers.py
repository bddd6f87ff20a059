"""altjax.models.layers: the towers' dropout draws nnx.Dropout's masks, shards them like the input.

``layers.Dropout`` draws its mask as a (leading axis, rest) array because XLA:CPU compiles a
rank-3/4 threefry draw several times slower; the masks, the state and its paths must stay nnx's.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from altjax import sharding
from altjax.models import layers


@pytest.mark.parametrize("shape, broadcast_dims", [
    ((7,), ()), ((3, 5), ()), ((4, 16, 64), ()), ((2, 4, 17, 17), ()), ((2, 3, 4, 5, 6), ()),
    ((4, 6, 6, 8), (1, 2)),
])
def test_dropout_gives_nnx_dropout_masks_and_state(shape, broadcast_dims):
    x = jnp.asarray(np.random.RandomState(0).randn(*shape) + 3.0, jnp.float32)
    ours = layers.Dropout(0.3, broadcast_dims=broadcast_dims, deterministic=False, rngs=nnx.Rngs(dropout=5))
    theirs = nnx.Dropout(0.3, broadcast_dims=broadcast_dims, deterministic=False, rngs=nnx.Rngs(dropout=5))
    ours_state, theirs_state = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state), "the variables differ"
    for draw in range(3):  # the stream advances alike
        got, want = np.asarray(ours(x)), np.asarray(theirs(x))
        dropped = int(np.sum((got == 0) != (want == 0)))
        assert dropped == 0, f"draw {draw}: {dropped} of {x.size} elements dropped differently"
        np.testing.assert_array_equal(got, want, err_msg=f"draw {draw}: kept values differ")
    assert 0 < np.mean(got == 0) < 0.6, f"{np.mean(got == 0):.2f} dropped at rate 0.3"


def test_dropout_mask_equals_bernoulli_with_a_traced_rate():
    key = jax.random.key(11)
    rate = jnp.float32(0.25)
    got = jax.jit(lambda k, r: layers.dropout_mask(k, 1.0 - r, (3, 4, 5, 6)))(key, rate)
    want = jax.random.bernoulli(key, 1.0 - rate, (3, 4, 5, 6))
    assert int(jnp.sum(got != want)) == 0, "the masks differ"


def test_dropout_off_and_at_rate_one():
    x = jnp.ones((2, 3, 4))
    dropout = layers.Dropout(0.5, deterministic=True, rngs=nnx.Rngs(0))
    assert dropout(x) is x, "a deterministic dropout changed its input"
    full = layers.Dropout(1.0, deterministic=False, rngs=nnx.Rngs(0))
    grad = jax.grad(lambda x: jnp.sum(full(x)))(x)
    assert not np.any(np.isnan(grad)), "rate 1.0 gave a NaN gradient"
    np.testing.assert_array_equal(full(x), 0.0)


def _u32_shapes(compiled_text: str) -> set[tuple[int, ...]]:
    return {tuple(int(n) for n in dims.split(",")) for dims in re.findall(r"u32\[([0-9,]+)\]", compiled_text)}


@pytest.mark.parametrize("mesh_shape, spec", [((8, 1), P("data")), ((2, 4), P("data", "model"))])
def test_dropout_draws_only_each_devices_share(mesh_shape, spec):
    mesh = sharding.make_mesh(*mesh_shape)
    x_sharding = NamedSharding(mesh, spec)
    x = jax.device_put(jnp.ones((16, 4, 16, 16)), x_sharding)
    dropout = layers.Dropout(0.1, deterministic=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(dropout)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    compiled = jax.jit(apply, out_shardings=x_sharding).lower(state, x).compile()
    share = x.size // mesh.size
    drawn = max(np.prod(s) for s in _u32_shapes(compiled.as_text()))
    assert drawn == share, f"each device draws {drawn} random words, its share is {share} of {x.size}"
    np.testing.assert_array_equal(np.asarray(jax.jit(apply)(state, x)), np.asarray(apply(state, x)),
                                  err_msg="the sharded draw differs from the unsharded one")
