"""The training step on a tiny ALIGN: its loss is the model's own ALIGN loss, gradient accumulation
and rematerialisation change nothing but float rounding, the 8-device sharded step equals the
1-device step, frozen parameters stay bit for bit, and weight decay skips norms, biases and the
temperature."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ml_collections

from altjax import sharding, train
from altjax.model_io import engine
from altjax.models import stack
from altjax.models.align import AlignConfig, AlignModel
from altjax.models.bert import BertConfig
from altjax.models.efficientnet import EfficientNetConfig
from altjax.training import optim
from altjax.training.objectives import attach_logit_bias, detach_logit_bias, logit_bias
from altjax.training.step import (_split_micro, batch_positions, init_state, loss_and_grads, make_train_step,
                                  process_batch_positions, split_model)
from altjax.training.tasks import align
from helpers import assert_close

B = 16


def optimizer(**values):
    """The demo recipe's optimizer config with ``values`` replaced."""
    opt = train.load_config("demo").optimizer
    opt.update(values)
    return opt


def align_objective(**loss):
    """The ALIGN task's objective for the config entries ``loss.*`` (ALIGN's, unless given)."""
    config = ml_collections.ConfigDict(dict(
        loss=dict(kind="softmax", label_smoothing=0.1, learn_temperature=True, learn_bias=True, impl="gather") | loss))
    return align.objective(config)


def tiny_config(bn_group_size=None, dropout=0.0) -> AlignConfig:
    return AlignConfig(
        text_config=BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout),
        # The stem and one stride-2 MBConv block (expansion, depthwise, squeeze-excite, projection).
        vision_config=EfficientNetConfig(image_size=16, width_coefficient=1.0, depth_coefficient=1.0,
                                         kernel_sizes=(3,), in_channels=(32,), out_channels=(16,), strides=(2,),
                                         num_block_repeats=(1,), expand_ratios=(2,), hidden_dim=16,
                                         drop_connect_rate=dropout, bn_group_size=bn_group_size),
        projection_dim=16, temperature_init_value=0.5)


def make_batch(n=B, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(10)[None, :] < rng.integers(3, 11, (n, 1))).astype(np.int32)
    return {"pixel_values": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
            "input_ids": (rng.integers(1, 50, (n, 10)) * mask).astype(np.int32),
            "attention_mask": mask, "token_type_ids": np.zeros((n, 10), np.int32)}


def train_model(config, seed=0, dtype=jnp.float32, remat=None):
    """``config``'s ALIGN in training mode, every layer rematerialised under the policy ``remat``."""
    # One jitted initialisation instead of a small program per parameter.
    model = nnx.jit(lambda: AlignModel(config, dtype=dtype, rngs=nnx.Rngs(seed)))()
    model.train()
    stack.set_remat(model, remat)
    return model


def grads_of(config, batch, *, accum=1, remat=None, mesh=None, dtype=jnp.float32, objective=None):
    graphdef, params, frozen, rest = split_model(train_model(config, dtype=dtype, remat=remat),
                                                 optim.trainable_filter(""))
    objective = objective or align_objective()
    fn = jax.jit(lambda p, r, b: loss_and_grads(graphdef, objective, p, frozen, r, b, mesh=mesh, accum_steps=accum))
    value, metrics, grads, new_rest = fn(params, rest, batch)
    return float(value), grads, new_rest


def flat(tree):
    def host(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return {sharding.path_to_str(p): host(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_close(actual, expected, rtol, what) -> float:
    """Every leaf within ``rtol`` of the largest value of the whole expected tree (gradients that
    are zero in exact arithmetic, like attention key biases', are float noise around 1e-12)."""
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), f"{what}: different leaves {sorted(a.keys() ^ e.keys())[:5]}"
    scale = max(float(np.max(np.abs(v))) for v in e.values() if v.size)
    return max(assert_close(a[k], e[k], atol=rtol * scale, what=f"{what} {k} (scale {scale:.3e})") / scale
               for k in a)


K = 4  # micro-batches in the accumulation test
# BatchNorm statistics per group of B/K examples, so that a micro-batch and the same rows of the
# big batch are normalised alike (with whole-batch statistics the two would be different models).
GROUPED = tiny_config(bn_group_size=B // K)


@pytest.fixture(scope="module")
def big_batch():
    """Loss, gradients and new statistics of one batch of B (shared by the comparisons below)."""
    batch = make_batch()
    return batch, grads_of(GROUPED, batch)


def test_step_loss_and_gradients_equal_the_models_return_loss(big_batch):
    batch, (value, grads, _) = big_batch
    model = train_model(GROUPED)
    reference = nnx.jit(nnx.value_and_grad(lambda m: m(**batch, return_loss=True).loss))
    ref_value, ref_grads = reference(model)
    assert_close(value, ref_value, atol=1e-6, what="train-step loss vs AlignModel(return_loss=True).loss")
    assert_trees_close(grads, ref_grads, 1e-6, "gradient vs the model's loss")


def test_sigmoid_and_fixed_temperature_variants(big_batch):
    """``kind="sigmoid"``: SigLIP's loss of the model's embeddings at logit scale 1/temperature and
    bias -10; ``learn_temperature=False``: the same loss and gradients, but none for the temperature."""
    from altjax import losses

    batch, (value, grads, _) = big_batch
    model = train_model(GROUPED)
    out = nnx.jit(lambda m: m(**batch))(model)
    want = losses.contrastive_loss(out.image_embeds, out.text_embeds, kind="sigmoid",
                                   logit_scale=1.0 / model.temperature[...], logit_bias=-10.0)
    sig_value, _, _ = grads_of(GROUPED, batch, objective=align_objective(kind="sigmoid"))
    assert_close(sig_value, float(want), atol=1e-5, what="sigmoid objective vs contrastive_loss(kind='sigmoid')")
    assert abs(sig_value - value) > 1e-3, f"sigmoid loss {sig_value} equals the softmax loss {value}"

    # With a learnable bias attached (as the trainer does for the sigmoid loss) the bias gets its gradient.
    attach_logit_bias(model, -4.0)
    graphdef, params, frozen, rest = split_model(model, optim.trainable_filter(""))
    value_b, _, grads_b, _ = jax.jit(lambda p, r, b: loss_and_grads(
        graphdef, align_objective(kind="sigmoid"), p, frozen, r, b, mesh=None))(params, rest, batch)
    want_b = losses.contrastive_loss(out.image_embeds, out.text_embeds, kind="sigmoid",
                                     logit_scale=1.0 / model.temperature[...], logit_bias=-4.0)
    assert_close(float(value_b), float(want_b), atol=1e-5, what="sigmoid objective with a learnable bias of -4")
    assert abs(float(flat(grads_b)["logit_bias"])) > 0, "the attached logit_bias has no gradient"
    assert logit_bias(detach_logit_bias(model)) == -10.0 and "logit_bias" not in flat(nnx.state(model)), "detach"

    fixed_value, fixed_grads, _ = grads_of(GROUPED, batch, objective=align_objective(learn_temperature=False))
    assert_close(fixed_value, value, atol=1e-6, what="loss with the temperature held")
    assert float(np.abs(flat(fixed_grads)["temperature"]).max()) == 0.0, "the held temperature has a gradient"
    assert abs(float(flat(grads)["temperature"])) > 0, "the learned temperature has no gradient"
    held, learned = flat(fixed_grads), flat(grads)
    scale = max(float(np.max(np.abs(v))) for v in learned.values())
    for key in learned.keys() - {"temperature"}:
        assert_close(held[key], learned[key], atol=1e-6 * scale, what=f"gradient of {key} with the temperature held")


def test_gradient_accumulation_equals_one_big_batch(big_batch):
    batch, (big_value, big_grads, _) = big_batch
    value, grads, _ = grads_of(GROUPED, batch, accum=K)
    assert_close(value, big_value, atol=2e-6, what=f"loss with {K} micro-batches vs one batch")
    assert_trees_close(grads, big_grads, 1e-6, f"gradient with {K} micro-batches vs one batch")


def test_batch_positions_make_each_micro_batch_a_slice_of_the_global_order():
    for devices, k in ((1, 1), (1, 4), (2, 2), (4, 2), (8, 4)):
        positions = batch_positions(32, devices, k)
        assert sorted(positions.tolist()) == list(range(32)), f"{devices} devices, {k} steps: not a permutation"
        micro = np.asarray(_split_micro(positions, k, devices))
        want = np.arange(32).reshape(k, 32 // k)
        assert np.array_equal(micro, want), f"{devices} devices x {k} micro-batches hold {micro.tolist()}"
    mesh = sharding.make_mesh()
    assert np.array_equal(process_batch_positions(mesh, 32, 2), batch_positions(32, 8, 2)), \
        "one process loads every row, in the layout of its 8 devices"


def test_accumulated_gradients_with_dropout_do_not_depend_on_the_device_count():
    """Each micro-batch holds the same examples on 8 devices as on 2 (rows laid out by
    batch_positions), so its dropout and drop-connect draws and BatchNorm groups are the same."""
    n = 2 * B  # 8 devices x K micro-batches
    config = tiny_config(bn_group_size=n // K, dropout=0.2)
    ordered = make_batch(n)
    results = []
    for devices in (2, 8):
        mesh = sharding.make_mesh(devices=jax.devices()[:devices])
        positions = batch_positions(n, devices, K)
        batch = sharding.shard_batch({k: v[positions] for k, v in ordered.items()}, mesh)
        results.append(grads_of(config, batch, accum=K, mesh=mesh))
    (v2, g2, r2), (v8, g8, r8) = results
    assert_close(v8, v2, atol=2e-6, what=f"loss with dropout and {K} micro-batches, 8 devices vs 2")
    assert_trees_close(g8, g2, 1e-5, f"gradient with dropout and {K} micro-batches, 8 devices vs 2")
    assert_trees_close(r8, r2, 1e-5, "BatchNorm statistics and dropout counters, 8 devices vs 2")


def test_rematerialisation_gives_the_same_loss_gradients_and_statistics(big_batch):
    batch, (value, grads, rest) = big_batch
    remat_value, remat_grads, remat_rest = grads_of(GROUPED, batch, remat="nothing_saveable")
    assert_close(remat_value, value, atol=1e-6, what="loss with rematerialised towers")
    assert_trees_close(remat_grads, grads, 1e-6, "gradient with rematerialised towers")
    assert_trees_close(remat_rest, rest, 1e-6, "BatchNorm statistics with rematerialisation")


def test_bfloat16_compute_keeps_float32_parameters_and_gradients(big_batch):
    batch, (value, grads, _) = big_batch
    bf16_value, bf16_grads, _ = grads_of(GROUPED, batch, dtype=jnp.bfloat16)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(bf16_grads)}
    assert dtypes == {"float32"}, f"gradient dtypes with bf16 compute: {dtypes}"
    # bf16 keeps 8 bits of mantissa: the loss within a few 1e-3 of the fp32 loss, gradients within 10 %.
    assert_close(bf16_value, value, atol=1e-2, what="loss with bfloat16 compute vs float32")
    assert_trees_close(bf16_grads, grads, 0.1, "gradient with bfloat16 compute vs float32")


def run_steps(config, mesh, batches, freeze="", model=None):
    """``(initial state, final state, losses)`` of LAMB steps on ``batches`` from ``model`` (default:
    ``config``'s ALIGN initialised with seed 0)."""
    opt = dict(name="lamb", learning_rate=1e-2, warmup_steps=0, decay="constant", weight_decay=1e-2,
               grad_clip_norm=1.0)
    if model is None:
        model = sharding.sharded_init(lambda rngs: AlignModel(config, rngs=rngs), mesh, seed=0)
    model.train()
    trainable = optim.trainable_filter(freeze)
    tx = optim.build(optimizer(**opt), 10, nnx.state(model, trainable))
    graphdef, state = init_state(model, trainable, tx)
    shardings = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh)
    state = jax.device_put(state, shardings)
    step = make_train_step(graphdef, align_objective(), tx, mesh=mesh, state_shardings=shardings,
                           batch_sharding=sharding.batch_sharding(mesh))
    initial = flat(state)
    values = []
    for batch in batches:
        state, metrics = step(state, sharding.shard_batch(batch, mesh))
        values.append(float(metrics["loss"]))
    return initial, flat(state), values


def part(state: dict, name: str) -> dict:
    """The leaves of one part ("params", "frozen", ...) of a flattened train state."""
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")}


def test_sharded_step_equals_the_single_device_step_and_frozen_parameters_stay_exact():
    # The text tower is locked (LiT locks the image tower; the mechanism is the same regex), so the
    # sharded gradients checked are the vision tower's, whose BatchNorm reduces across devices.
    config, freeze = tiny_config(), "^text_model/"
    batches = [make_batch(seed=s) for s in range(2)]
    assert len(jax.devices()) == 8
    _, one, one_losses = run_steps(config, sharding.make_mesh(devices=jax.devices()[:1]), batches, freeze)
    initial, eight, eight_losses = run_steps(config, sharding.make_mesh(), batches, freeze)
    for i, (a, b) in enumerate(zip(eight_losses, one_losses)):
        assert_close(a, b, atol=1e-5, what=f"step {i + 1} loss on 8 devices vs 1")
    assert_trees_close(part(eight, "params"), part(one, "params"), 1e-5, "parameters after 2 steps on 8 devices vs 1")
    assert_trees_close(part(eight, "rest"), part(one, "rest"), 1e-5, "BatchNorm statistics on 8 devices vs 1")

    frozen_before, frozen_after = part(initial, "frozen"), part(eight, "frozen")
    assert frozen_before and all(k.startswith("text_model/") for k in frozen_before), sorted(frozen_before)[:3]
    changed = [k for k in frozen_before if not np.array_equal(frozen_before[k], frozen_after[k])]
    assert not changed, f"frozen parameters changed: {changed[:5]}"
    trained, before = part(eight, "params"), part(initial, "params")
    assert not any(k.startswith("text_model/") for k in trained), "text parameters are trainable"
    still = [k for k in trained if np.array_equal(before[k], trained[k])]
    assert not still, f"trainable parameters that did not move: {still[:5]}"
    assert "temperature" in trained, "the temperature is not trained"


def in_torch_keys(state: dict, config: AlignConfig) -> dict:
    """The parameters and statistics of a flattened train state, named as transformers names them."""
    values = {k.replace("/", "."): v for name in ("params", "rest") for k, v in part(state, name).items()}
    table = AlignModel.conversion_table(config)
    return engine.nnx_to_torch({k: v for k, v in values.items() if k in {r.nnx for r in table.rows}}, table,
                               on_disk=False)


def _deeper(config, tower: str, *, scan: bool):
    """``config`` with its ``tower`` deep enough to stack, scanned or not: 3 BERT layers, or an
    EfficientNet whose stage repeats its block twice more (no drop-connect: the two layouts draw
    other masks)."""
    if tower == "text":
        return dataclasses.replace(config, text_config=dataclasses.replace(
            config.text_config, num_hidden_layers=3, scan_layers=scan))
    return dataclasses.replace(config, vision_config=dataclasses.replace(
        config.vision_config, num_block_repeats=(3,), drop_connect_rate=0.0, scan_layers=scan))


@pytest.mark.parametrize("tower, stacked_key", [
    ("text", "text_model.encoder.layer.attention.self.query.kernel"),
    ("vision", "vision_model.encoder.groups.1.layers.depthwise_conv.depthwise_conv.kernel"),
])
def test_scanned_layers_train_as_unrolled_ones(tower, stacked_key):
    """LAMB steps (per-parameter trust ratios, weight decay) on 8 devices (FSDP) from the same
    weights: BERT's layers, or EfficientNet's repeated blocks (BatchNorm statistics updated inside
    the scan), stacked and scanned train exactly as unrolled (losses 1e-5, every parameter and
    statistic after 2 steps within 1e-5 of the largest)."""
    unrolled_config, scanned_config = (_deeper(tiny_config(), tower, scan=scan) for scan in (False, True))
    mesh, batches = sharding.make_mesh(), [make_batch(seed=s) for s in range(2)]
    unrolled = sharding.sharded_init(lambda rngs: AlignModel(unrolled_config, rngs=rngs), mesh, seed=0)
    scanned = nnx.eval_shape(lambda: AlignModel(scanned_config, rngs=nnx.Rngs(0)))
    tensors = engine.nnx_to_torch(engine.model_params(unrolled), AlignModel.conversion_table(unrolled_config))
    engine.load_params(scanned, engine.torch_to_nnx(tensors, AlignModel.conversion_table(scanned_config),
                                                    engine.model_shapes(scanned)))
    nnx.reseed(scanned, default=0, dropout=0, policy="match_shape")
    assert stacked_key in engine.model_shapes(scanned), f"not stacked: {sorted(engine.model_shapes(scanned))[:5]}"
    _, one, one_losses = run_steps(unrolled_config, mesh, batches, model=unrolled)
    _, other, other_losses = run_steps(scanned_config, mesh, batches, model=scanned)
    for i, (a, b) in enumerate(zip(other_losses, one_losses)):
        assert_close(a, b, atol=1e-5, what=f"{tower}: step {i + 1} loss scanned vs unrolled")
    expected, got = in_torch_keys(one, unrolled_config), in_torch_keys(other, scanned_config)
    assert got.keys() == expected.keys(), f"different tensors: {sorted(got.keys() ^ expected.keys())[:5]}"
    assert_trees_close(got, expected, 1e-5, f"{tower}: after 2 LAMB steps, scanned vs unrolled")


def test_weight_decay_mask_skips_norms_biases_and_temperature():
    params = nnx.state(train_model(tiny_config()), nnx.Param)
    mask = flat(optim.decay_mask(params, optimizer().no_decay))
    decayed = {k for k, v in mask.items() if v}
    assert decayed, "nothing decays"
    for k in mask:
        leaf = k.rsplit("/", 1)[-1]
        expect = leaf in ("kernel", "embedding")
        assert (k in decayed) == expect, f"{k}: decays={k in decayed}, expected {expect}"

    # The mask is what optax applies: a zero gradient moves only decayed parameters.
    tx = optim.build(optimizer(name="adamw", learning_rate=1.0, warmup_steps=0, decay="constant", weight_decay=0.1,
                               eps=1e-8, grad_clip_norm=0.0),
                     10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = flat(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(zeros, params))
    moved = {k for k, v in updates.items() if np.any(v != 0)}
    assert moved == decayed, f"weight decay moved {sorted(moved ^ decayed)[:5]} contrary to the mask"


def test_schedules():
    for decay in ("linear", "cosine"):
        lr = optim.schedule(optimizer(learning_rate=1e-3, warmup_steps=10, decay=decay, end_factor=0.0), 110)
        got = [float(lr(s)) for s in (0, 5, 10, 60, 110)]
        want = [0.0, 5e-4, 1e-3, 5e-4, 0.0]  # half way through the decay both are at half the peak
        assert np.allclose(got, want, atol=1e-9), f"{decay} schedule at 0/5/10/60/110: {got}, expected {want}"
    with pytest.raises(ValueError, match="decay"):
        optim.schedule(optimizer(learning_rate=1.0, decay="step"), 10)
