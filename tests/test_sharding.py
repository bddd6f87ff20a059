"""altjax.sharding on 8 simulated devices: the mesh, partition rules, sharded init, batches."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from altjax import sharding
from tests.helpers import assert_close


class TinyModel(nnx.Module):
    """A few layers whose shapes exercise every branch of the default rules."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embeddings = nnx.Embed(1000, 64, rngs=rngs)                 # (1000, 64): dim 0
        self.layers = nnx.List([nnx.Linear(64, 256, rngs=rngs),          # (64, 256): dim 1
                                nnx.Linear(256, 48, rngs=rngs)])          # (256, 48): dim 0
        self.head = nnx.Linear(48, 20, rngs=rngs)                        # (48, 20): 48 divides
        self.odd = nnx.Linear(20, 30, rngs=rngs)                         # (20, 30): nothing divides
        self.logit_scale = nnx.Param(jnp.asarray(2.6592))
        self.dropout = nnx.Dropout(0.1, rngs=rngs)


def make_model(rngs: nnx.Rngs):
    return TinyModel(rngs=rngs)


class StackedModel(nnx.Module):
    """16 stacked layers, as ``scan_layers`` builds them: the kernels' (16, 8, 4) has the layer
    axis the largest dimension, divisible by 8."""

    def __init__(self, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=16)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs: nnx.Rngs) -> nnx.Module:
            return nnx.Linear(8, 4, rngs=rngs)

        self.layers = stacked(rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)


EXPECTED_STACKED = {
    "layers/kernel": P(None, "data", None),
    "layers/bias": P(),                   # 64 elements < MIN_SIZE
    "dropout/rngs/key": P(),
    "dropout/rngs/count": P(),
}


MIN_SIZE = 512  # so that the tiny kernels count as "large"

EXPECTED_8x1 = {
    "embeddings/embedding": P("data", None),
    "layers/0/kernel": P(None, "data"),
    "layers/0/bias": P(),                 # 256 elements < MIN_SIZE
    "layers/1/kernel": P("data", None),
    "layers/1/bias": P(),
    "head/kernel": P("data", None),
    "head/bias": P(),
    "odd/kernel": P(),                    # neither 20 nor 30 divisible by 8
    "odd/bias": P(),
    "logit_scale": P(),
    "dropout/rngs/key": P(),
    "dropout/rngs/count": P(),
}


def _specs(state):
    return {sharding.path_to_str(path): leaf.sharding.spec
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def test_make_mesh():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 8, "model": 1}, mesh
    mesh = sharding.make_mesh(data=-1, model=2)
    assert dict(mesh.shape) == {"data": 4, "model": 2}, mesh
    assert sharding.batch_axes(mesh) == ("data",)
    assert sharding.batch_size_divisor(mesh) == 4
    mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 2, "model": 1}, mesh
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(data=-1, model=3)
    with pytest.raises(ValueError, match="does not use the 8 devices"):
        sharding.make_mesh(data=2, model=2)


def test_partition_spec_rules():
    mesh = sharding.make_mesh()
    spec = lambda path, shape, **kw: sharding.partition_spec(path, shape, mesh, **kw)
    assert spec("temperature", ()) == P()
    assert spec("text_model/encoder/layer/0/attention/self/query/kernel", (768, 768)) == P(None, "data")
    assert spec("text_projection/kernel", (768, 640)) == P("data", None)
    assert spec("text_projection/bias", (640,)) == P()                      # below FSDP_MIN_SIZE
    assert spec("text_projection/bias", (640,), fsdp_min_size=1) == P("data")
    assert spec("embeddings/word_embeddings/embedding", (250002, 1024)) == P(None, "data")
    # The first matching rule wins; specs are checked against the shape and the mesh.
    rules = ((r"query/kernel$", P("data", None)), (r".*", sharding.FSDP))
    assert spec("attention/self/query/kernel", (768, 768), rules=rules) == P("data", None)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        spec("attention/self/query/kernel", (20, 768), rules=rules)
    with pytest.raises(ValueError, match="no partition rule matches"):
        spec("anything", (8,), rules=((r"^kernel$", P()),))


def test_fsdp_never_splits_the_layer_axis():
    mesh = sharding.make_mesh()
    spec = lambda path, shape, **kw: sharding.partition_spec(path, shape, mesh, **kw)
    stacked = "vision_model/encoder/layers/mlp/fc1/kernel"
    # (L, D, F) with L = 16 the largest dimension and divisible by the 8 devices: an unstacked
    # parameter of that shape is split on dimension 0, a stacked one on the largest other one.
    assert spec("visual_projection/kernel", (16, 8, 4), fsdp_min_size=512) == P("data", None, None)
    assert spec(stacked, (16, 8, 4), fsdp_min_size=512) == P(None, "data", None)
    assert spec("opt_state/1/0/mu/" + stacked, (16, 8, 4), fsdp_min_size=512) == P(None, "data", None)
    assert spec("vision_model/encoder/layers/3/mlp/fc1/kernel", (16, 8), fsdp_min_size=1) == P("data", None)
    # Nothing but the layer axis divisible: replicated.
    assert spec(stacked, (16, 12, 20), fsdp_min_size=1) == P()
    # The threshold counts every element, the layers' together: 16 x 32 = 512.
    assert spec(stacked, (16, 8, 4), fsdp_min_size=513) == P()
    _, state = sharding.abstract_state(lambda rngs: StackedModel(rngs=rngs), mesh, fsdp_min_size=MIN_SIZE)
    assert _specs(state) == EXPECTED_STACKED


def test_a_rule_may_not_split_the_layer_axis():
    mesh = sharding.make_mesh()
    rules = ((r"fc1/kernel$", P("data", None, None)), (r".*", sharding.FSDP))
    with pytest.raises(ValueError, match="splits dimension 0, the layer axis"):
        sharding.partition_spec("vision_model/encoder/layers/mlp/fc1/kernel", (16, 8, 4), mesh, rules)
    # Unrolled, the same rule is fine; stacked, a rule on the other dimensions is.
    assert sharding.partition_spec("vision_model/encoder/layers/0/mlp/fc1/kernel", (16, 8, 4), mesh, rules) \
        == P("data", None, None)
    rules = ((r"fc1/kernel$", P(None, "data")), (r".*", sharding.FSDP))
    assert sharding.partition_spec("vision_model/encoder/layers/mlp/fc1/kernel", (16, 8, 4), mesh, rules) \
        == P(None, "data")


def test_state_shardings_follow_the_rules():
    _, state = sharding.abstract_state(make_model, sharding.make_mesh(), fsdp_min_size=MIN_SIZE)
    assert _specs(state) == EXPECTED_8x1


def test_tensor_parallel_rule_on_a_model_axis():
    mesh = sharding.make_mesh(data=4, model=2)
    rules = ((r"layers/0/kernel$", P(None, "model")), (r"layers/1/kernel$", P("model", None))) \
        + sharding.PARTITION_RULES
    model = sharding.sharded_init(make_model, mesh, rules, fsdp_min_size=MIN_SIZE)
    specs = _specs(nnx.state(model))
    assert specs["layers/0/kernel"] == P(None, "model") and specs["layers/1/kernel"] == P("model", None), specs
    assert specs["embeddings/embedding"] == P("data", None), specs   # FSDP over the 4-way data axis
    assert specs["odd/kernel"] == P("data", None), specs             # 20 is divisible by 4
    kernel = model.layers[0].kernel[...]
    assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}, "model-axis shards"


def test_sharded_init_equals_unsharded_init():
    mesh = sharding.make_mesh()
    model = sharding.sharded_init(make_model, mesh, fsdp_min_size=MIN_SIZE)
    reference = nnx.state(make_model(nnx.Rngs(0)))
    assert _specs(nnx.state(model)) == EXPECTED_8x1
    for (path, got), (_, ref) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(model)),
                                     jax.tree_util.tree_leaves_with_path(reference)):
        name = sharding.path_to_str(path)
        if jnp.issubdtype(ref.dtype, jax.dtypes.prng_key):
            got, ref = jax.random.key_data(got), jax.random.key_data(ref)
        assert_close(got, ref, atol=0.0, what=f"sharded init of {name}")
    shards = model.embeddings.embedding[...].addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(125, 64)}, "embedding shards"


@pytest.mark.parametrize("module, expected", [(TinyModel, EXPECTED_8x1), (StackedModel, EXPECTED_STACKED)])
def test_sharded_init_from_a_seed_equals_unsharded_init(module, expected):
    """``make_model(rngs)`` with a seed: the same values as ``make_model(nnx.Rngs(seed))``, the rng
    counters on the host while the model is traced (what keeps a deep model's build linear in its
    depth)."""
    counters = []

    def make(rngs):
        counters.append({type(count.get_value()) for _, count in nnx.to_flat_state(nnx.state(rngs, nnx.RngCount))})
        return module(rngs=rngs)

    mesh = sharding.make_mesh()
    _, abstract = sharding.abstract_state(make, mesh, fsdp_min_size=MIN_SIZE, seed=3)
    assert _specs(abstract) == expected
    model = sharding.sharded_init(make, mesh, fsdp_min_size=MIN_SIZE, seed=3)
    # Built thrice: by abstract_state, by sharded_init's own abstract_state and under its jit.
    assert counters == [{np.ndarray}] * 3, f"rng counter types while traced: {counters}"
    assert _specs(nnx.state(model)) == expected
    reference = nnx.state(module(rngs=nnx.Rngs(3)))
    for (path, got), (_, ref) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(model)),
                                     jax.tree_util.tree_leaves_with_path(reference)):
        name = sharding.path_to_str(path)
        if jnp.issubdtype(ref.dtype, jax.dtypes.prng_key):
            got, ref = jax.random.key_data(got), jax.random.key_data(ref)
        assert isinstance(got, jax.Array), f"{name} is a {type(got)}"
        assert_close(got, ref, atol=0.0, what=f"sharded init from a seed of {name}")


def test_host_counters_draw_the_keys_of_jax_counters():
    """Under jit, where a NumPy counter updated in place would be read at its final value."""
    def draws(host: bool):
        rngs = nnx.Rngs(5, dropout=6)
        with sharding.host_counters(rngs) if host else contextlib.nullcontext(rngs):
            keys = [rngs.default() for _ in range(3)] + [rngs.dropout(), rngs.dropout()]
        return [jax.random.key_data(k) for k in keys], nnx.state(rngs, nnx.RngCount)

    got, got_counts = jax.jit(lambda: draws(True))()
    want, want_counts = draws(False)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=0.0, what=f"key {i} drawn with host counters")
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got_counts),
                                 jax.tree_util.tree_leaves_with_path(want_counts)):
        assert isinstance(a, jax.Array), f"counter {sharding.path_to_str(path)} is a {type(a)} after the context"
        assert_close(a, b, atol=0.0, what=f"counter {sharding.path_to_str(path)}")


def test_sharded_init_never_holds_a_full_replica():
    """The compiled initialiser's per-device output and temporaries stay below the full model."""
    mesh = sharding.make_mesh()
    graphdef, abstract = sharding.abstract_state(make_model, mesh, fsdp_min_size=MIN_SIZE)
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)
               if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)
                  if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))
    init = jax.jit(lambda: nnx.split(make_model(nnx.Rngs(0)))[1],
                   out_shardings=jax.tree.map(lambda x: x.sharding, abstract))
    memory = init.lower().compile().memory_analysis()
    assert memory.output_size_in_bytes < full / 4, \
        f"per-device init output {memory.output_size_in_bytes} B, full model {full} B"
    assert memory.temp_size_in_bytes < largest, \
        f"per-device init temporaries {memory.temp_size_in_bytes} B >= the largest parameter ({largest} B)"


@pytest.mark.parametrize("data, model", [(8, 1), (4, 2)])
def test_shard_batch_from_process_local_data(data, model):
    mesh = sharding.make_mesh(data=data, model=model)
    rng = np.random.default_rng(0)
    global_batch = {"pixels": rng.normal(size=(16, 4, 4, 3)).astype(np.float32),
                    "ids": rng.integers(0, 100, size=(16, 7)).astype(np.int32)}
    rows = sharding.process_batch_rows(mesh, 16)
    assert rows == slice(0, 16), f"a single process loads every row, got {rows}"
    batch = sharding.shard_batch({k: v[rows] for k, v in global_batch.items()}, mesh)
    for name, array in batch.items():
        assert array.shape == global_batch[name].shape, f"{name}: global shape {array.shape}"
        assert array.sharding.spec == P("data"), f"{name}: {array.sharding}"
        assert {s.data.shape[0] for s in array.addressable_shards} == {16 // data}, f"{name} shard rows"
        assert_close(np.asarray(array), global_batch[name], atol=0.0, what=f"sharded batch {name}")
    with pytest.raises(ValueError, match="not divisible"):
        sharding.process_batch_rows(mesh, 12 if data == 8 else 10)
