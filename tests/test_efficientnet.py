"""The EfficientNet image tower against transformers' AlignVisionModel with random weights.

Weights, BatchNorm affine parameters and BatchNorm running statistics are all randomised on the
torch side (running mean ~ N(0, 0.1^2), running var ~ U(0.5, 1.5)), so that eval mode really uses
the statistics. Tolerances (float32): outputs and updated running statistics 1e-5 absolute on the
tiny configs (activations are O(1)); gradients 1e-4 relative to the largest reference gradient of
each tensor; the full-size B7 outputs 1e-4 absolute (55 blocks accumulate rounding);
bf16 compute: cosine >= 0.999 to the fp32 reference; conversions bit-exact. The kernels with
hand-written gradients (depthwise convolution, BatchNorm) are tested in test_ops.py.
"""
import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from altjax.model_io import engine
from altjax.models.efficientnet import (
    EFFICIENTNET_PRESETS,
    BlockStack,
    block_groups,
    EfficientNet,
    EfficientNetConfig,
    _conv,
    _same_padding,
    block_specs,
    efficientnet_config,
    efficientnet_table,
)
from altjax.models.ops.batch_norm import BatchNorm
from helpers import assert_close, assert_rel_close, assert_round_trip, cosine, from_torch_state, torch_state

# Tiny configurations: k3/k5/k7 depthwise kernels, stride-2 stages with adjusted and non-adjusted
# (depthwise_padding) pads, expand ratio 1 with residual repeats, width/depth coefficients != 1,
# mean and max pooling. The stem always has round_filters(32) channels, so in_channels[0] is 32.
CONFIGS = {
    "k353-w0.5-d1.2-pad5": dict(
        in_channels=[32, 16, 24], out_channels=[16, 24, 40], kernel_sizes=[3, 5, 3], strides=[1, 2, 2],
        num_block_repeats=[1, 2, 2], expand_ratios=[1, 6, 3], width_coefficient=0.5, depth_coefficient=1.2,
        depthwise_padding=[5],
    ),
    "k53-w1.3-d0.8-pad0": dict(
        in_channels=[32, 24], out_channels=[24, 32], kernel_sizes=[5, 3], strides=[2, 2],
        num_block_repeats=[2, 3], expand_ratios=[1, 4], width_coefficient=1.3, depth_coefficient=0.8,
        depthwise_padding=[0],
    ),
    "k3375-max": dict(
        in_channels=[32, 16, 24, 40], out_channels=[16, 24, 40, 48], kernel_sizes=[3, 3, 7, 5], strides=[1, 2, 1, 2],
        num_block_repeats=[1, 1, 2, 2], expand_ratios=[1, 2, 6, 1], width_coefficient=1.0, depth_coefficient=1.0,
        pooling_type="max",
    ),
}


def test_tiny_configs_cover_the_padding_cases():
    # depthwise_padding only matters on stride-2 blocks: make sure the configs put it there.
    for name, c in CONFIGS.items():
        specs = block_specs(EfficientNetConfig(**c))
        assert all(specs[i].stride == 2 and not specs[i].adjust_padding for i in c.get("depthwise_padding", [])), name
    kernels = {(s.kernel_size, s.stride) for c in CONFIGS.values() for s in block_specs(EfficientNetConfig(**c))}
    assert {(3, 2), (5, 2), (3, 1), (5, 1), (7, 1)} <= kernels, kernels


def hf_config(name, **overrides):
    return transformers.AlignVisionConfig(**{**CONFIGS[name], **overrides})


def randomise_(module, seed):
    """Random conv weights of O(1) activations, random BatchNorm affine parameters and statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 4:
                p.copy_(noise / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return module


def torch_model(hc, seed):
    torch.manual_seed(seed)
    return randomise_(transformers.AlignVisionModel(hc), seed)


def images(batch, size, seed):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def nchw(x):
    return torch.tensor(x).permute(0, 3, 1, 2)


convert_state = functools.partial(from_torch_state, EfficientNet, table=efficientnet_table)


def jitted(model, output_hidden_states=True):
    """A jitted eval-mode forward of the NNX model (split/merge)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, output_hidden_states=output_hidden_states)

    return lambda x: forward(state, jnp.asarray(x))


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.detach().numpy()


def compare_outputs(out, ref, what, atol=1e-5):
    diffs = {
        field: assert_close(getattr(out, field), nhwc(getattr(ref, field)), atol=atol, what=f"{what} {field}")
        for field in ("last_hidden_state", "pooler_output")
    }
    if out.hidden_states is not None:
        n, n_ref = len(out.hidden_states), len(ref.hidden_states)
        assert n == n_ref, f"{what}: {n} hidden states, the reference has {n_ref}"
        diffs["hidden_states"] = max(
            assert_close(a, nhwc(b), atol=atol, what=f"{what} hidden_states[{i}]")
            for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states))
        )
    print(f"{what}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return diffs


@pytest.mark.parametrize(
    "name,size,batch",
    [
        ("k353-w0.5-d1.2-pad5", 33, 2),
        ("k353-w0.5-d1.2-pad5", 32, 3),
        ("k53-w1.3-d0.8-pad0", 47, 3),
        ("k3375-max", 33, 2),
    ],
)
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_eval_matches_align_vision_model(name, size, batch, scan):
    hc = hf_config(name)
    cfg = EfficientNetConfig.from_hf(hc.to_dict(), scan_layers=scan)
    tm = torch_model(hc, seed=1).eval()
    x = images(batch, size, seed=2)
    with torch.no_grad():
        ref = tm(nchw(x), output_hidden_states=True)
    compare_outputs(jitted(convert_state(torch_state(tm), cfg))(x), ref, f"{name} {size}px eval{' scanned' * scan}")


def train_step(model, x, w):
    """One jitted train-mode forward and backward of ``sum(pooler_output * w)``.

    Returns the outputs, the gradients (NNX path -> array) and the model with its BatchNorm
    statistics updated.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x):
        m = nnx.merge(graphdef, state)

        def loss(m):
            out = m(x)
            return jnp.sum(out.pooler_output * w), out

        grads, out = nnx.grad(loss, has_aux=True)(m)
        return grads, out, nnx.state(m, nnx.BatchStat)

    grads, out, stats = step(state, jnp.asarray(x))
    nnx.update(model, stats)
    flat = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    return out, flat


def torch_grads(flat, cfg):
    """NNX gradients under their PyTorch parameter names, in the PyTorch layout (a stacked
    gradient's row read at its layer index)."""
    return {r.torch: engine.LAYOUTS[r.layout][1](flat[r.nnx] if r.index is None else flat[r.nnx][r.index])
            for r in efficientnet_table(cfg).rows if r.nnx in flat}


def compare_running_stats(model, tm_state, cfg, what):
    ours = engine.nnx_to_torch(engine.model_params(model), efficientnet_table(cfg), on_disk=False)
    keys = [k for k in tm_state if k.endswith(("running_mean", "running_var"))]
    worst = max(assert_close(ours[k], tm_state[k], atol=1e-5, what=f"{what} updated {k}") for k in keys)
    print(f"{what}: running statistics of {len(keys) // 2} BatchNorms, max diff {worst:.2e}")


@pytest.mark.parametrize("name,size", [("k353-w0.5-d1.2-pad5", 33), ("k53-w1.3-d0.8-pad0", 47)])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_train_mode_outputs_running_stats_and_gradients_match(name, size, scan):
    hc = hf_config(name, drop_connect_rate=0.0)
    cfg = EfficientNetConfig.from_hf(hc.to_dict(), scan_layers=scan)
    tm = torch_model(hc, seed=3)
    model = convert_state(torch_state(tm), cfg)
    model.train()
    tm.train()
    x = images(3, size, seed=4)
    width = tm.encoder.blocks[-1].projection.project_bn.num_features
    w = np.random.default_rng(5).normal(size=(3, width)).astype(np.float32)

    # The outputs are compared with the same model run in float64: train-mode BatchNorm over three
    # images leaves activations near 9, where float32 rounding alone is ~1e-6 relative and
    # PyTorch's own float32 result differs from the exact one by 8e-6 on some CPUs, so a float32
    # reference would spend most of the 1e-5 tolerance on its own rounding.
    exact = copy.deepcopy(tm).double()(nchw(x).double())
    ref = tm(nchw(x))
    (ref.pooler_output * torch.tensor(w)).sum().backward()
    out, grads = train_step(model, x, w)
    compare_outputs(out, exact, f"{name} train")
    compare_running_stats(model, torch_state(tm), cfg, f"{name} train")

    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    ours = torch_grads(grads, cfg)
    assert set(ours) == set(ref_grads), f"gradient key sets differ: {sorted(set(ours) ^ set(ref_grads))}"
    model_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    zero = shift_invariant_biases(cfg)
    worst = 0.0
    for key, g in ref_grads.items():
        if key in zero:
            for side, v in (("altjax", ours[key]), ("torch", g)):
                noise = float(np.max(np.abs(v))) / model_scale
                assert noise <= 1e-4, f"{name} {side} gradient of {key} (0 in theory) is {noise:.3e} of the largest"
            continue
        worst = max(worst, assert_rel_close(ours[key], g, rtol=1e-4, what=f"{name} gradient of {key}"))
    print(f"{name}: {len(ref_grads) - len(zero)} gradients, max relative diff {worst:.2e}; {len(zero)} zero in theory")


def shift_invariant_biases(cfg):
    """BatchNorm biases whose gradient is exactly zero in training mode.

    A per-channel constant added to a block's output (its project_bn bias, or the stem's bias)
    passes unchanged through residual connections, and an expanding block's 1x1 conv turns it into
    another constant that the training-mode BatchNorm after it subtracts again. If every path from
    the bias ends like that before reaching an unexpanded block (whose zero-padded depthwise conv
    does not map a constant to a constant) or the pooler, the loss does not depend on the bias and
    both gradients are rounding noise; they are measured against the model's largest gradient.
    """
    specs = block_specs(cfg)

    def cancelled_after(i):
        for spec in specs[i + 1 :]:
            if not spec.expand:
                return False
            if spec.id_skip or spec.stride != 1:
                return True
        return False

    names = {-1: "embeddings.batchnorm.bias"}
    names.update({s.index: f"encoder.blocks.{s.index}.projection.project_bn.bias" for s in specs})
    return {name for i, name in names.items() if cancelled_after(i)}


def test_bn_group_size_equals_running_each_group_separately():
    hc = hf_config("k353-w0.5-d1.2-pad5", drop_connect_rate=0.0)
    cfg = dataclasses.replace(EfficientNetConfig.from_hf(hc.to_dict()), bn_group_size=2)
    state = torch_state(torch_model(hc, seed=6))
    model = convert_state(state, cfg)
    model.train()
    x = images(4, 33, seed=7)
    w = np.random.default_rng(8).normal(size=(4, 24)).astype(np.float32)
    out, _ = train_step(model, x, w)

    # Each half through its own copy of the torch model, as two replicas with per-replica BatchNorm.
    refs, states = [], []
    for half in (x[:2], x[2:]):
        tm = torch_model(hc, seed=6).train()
        with torch.no_grad():
            refs.append(tm(nchw(half)))
        states.append(torch_state(tm))
    for field in ("last_hidden_state", "pooler_output"):
        expected = np.concatenate([nhwc(getattr(r, field)) for r in refs])
        diff = assert_close(getattr(out, field), expected, atol=1e-5, what=f"bn_group_size=2 {field}")
        print(f"bn_group_size=2: {field} max diff {diff:.2e}")
    # The running statistics take the mean over groups: the average of the two replicas' buffers.
    averaged = {k: (states[0][k] + states[1][k]) / 2 for k in states[0] if k.endswith(("running_mean", "running_var"))}
    compare_running_stats(model, averaged, cfg, "bn_group_size=2")

    with pytest.raises(ValueError, match="group_size 2 does not divide the batch size 3"):
        model(jnp.asarray(images(3, 33, seed=9)))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_train_mode_dropout_is_active_and_eval_restores(scan):
    hc = hf_config("k53-w1.3-d0.8-pad0", drop_connect_rate=0.5)
    cfg = EfficientNetConfig.from_hf(hc.to_dict(), scan_layers=scan)
    model = convert_state(torch_state(torch_model(hc, seed=10).eval()), cfg)
    x = jnp.asarray(images(2, 33, seed=11))
    before = jitted(model, False)(x).pooler_output
    # Train mode with dropout only (BatchNorm on running statistics), so dropout alone can differ.
    model.train()
    model.set_attributes(BatchNorm, use_running_average=True)
    dropped = jitted(model, False)(x).pooler_output
    model.eval()
    after = jitted(model, False)(x).pooler_output
    assert float(jnp.max(jnp.abs(dropped - before))) > 1e-2, "train() did not turn the residual dropout on"
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg="eval() did not turn dropout off")


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_pointwise_convolutions_run_as_dots(dtype, rtol):
    """A 1x1 stride-1 convolution runs as a dot over channels (XLA:CPU leaves 1x1 convolutions
    inside scanned stages as slow generic ones): the same output and gradients as the convolution,
    with no convolution in its program; other kernels stay convolutions."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 7, 8), jnp.float32)
    pointwise = _conv(8, 12, 1, use_bias=True, dtype=dtype, rngs=nnx.Rngs(0))
    kernel, bias = pointwise.kernel[...], pointwise.bias[...]

    def reference(x, kernel, bias):
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), ((0, 0), (0, 0)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(dtype)

    graphdef, state = nnx.split(pointwise)

    def ours(x, kernel, bias):
        module = nnx.merge(graphdef, state, copy=True)
        module.kernel[...], module.bias[...] = kernel, bias
        return module(x)

    assert_rel_close(ours(x, kernel, bias), reference(x, kernel, bias), rtol=rtol, what=f"{dtype.__name__} output")
    for i, name in enumerate(("input", "kernel", "bias")):
        got = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) ** 2), argnums=i)(x, kernel, bias)
        want = jax.grad(lambda *a: jnp.sum(reference(*a).astype(jnp.float32) ** 2), argnums=i)(x, kernel, bias)
        assert_rel_close(got, want, rtol=rtol, what=f"{dtype.__name__} gradient of the {name}")
    program = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(pointwise(x))))(x))
    assert "conv_general_dilated" not in program and "dot_general" in program, "the 1x1 convolution is not a dot"
    wide = _conv(8, 12, 3, padding=_same_padding(3), dtype=dtype, rngs=nnx.Rngs(0))
    assert "conv_general_dilated" in str(jax.make_jaxpr(wide)(x)), "a 3x3 convolution no longer convolves"


def test_a_scanned_block_drops_at_its_own_rate():
    """The dropout of a scanned block takes its rate as data (the scan's per-layer input): zeros at
    that rate, the kept values scaled by 1 / (1 - rate), as nnx.Dropout at a static rate."""
    cfg = EfficientNetConfig(**CONFIGS["k53-w1.3-d0.8-pad0"], scan_layers=True)
    model = EfficientNet(cfg, rngs=nnx.Rngs(0))
    stacked = next(g for g in model.encoder.groups if isinstance(g, BlockStack))
    layer = nnx.merge(*nnx.split(stacked.layers))  # the stack's first layer, as the scan sees it
    projection = jax.tree.map(lambda x: x[0], layer).projection
    projection.dropout.deterministic = False
    x = jnp.ones((64, 16, 16, 8))
    for rate in (0.0, 0.25, 0.6):
        y = np.asarray(projection._dropout_at(x, jnp.float32(rate)))
        dropped = float(np.mean(y == 0))
        assert abs(dropped - rate) < 0.01, f"rate {rate}: {dropped:.4f} of the values dropped"
        kept = np.unique(y[y != 0])
        assert np.allclose(kept, 1 / (1 - rate)), f"rate {rate}: kept values {kept[:4]}, want {1 / (1 - rate)}"


def test_scanned_encoder_stacks_the_repeats_of_each_stage():
    """B7's 55 blocks run as 14 segments: each stage's first block alone, its repeats in one scan."""
    groups = block_groups(block_specs(EfficientNetConfig()))
    assert [len(g) for g in groups] == [1, 3, 1, 6, 1, 6, 1, 9, 1, 9, 1, 12, 1, 3], [len(g) for g in groups]
    # A depthwise padding listed for one repeat (not for its neighbours) cuts its run.
    specs = block_specs(EfficientNetConfig(depthwise_padding=(9,)))
    assert [[s.index for s in g] for g in block_groups(specs)][2:6] == [[4], [5, 6, 7, 8], [9], [10]], \
        [[s.index for s in g] for g in block_groups(specs)]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_round_trip_is_bit_exact(name, scan):
    hc = hf_config(name)
    cfg = EfficientNetConfig.from_hf(hc.to_dict(), scan_layers=scan)
    state = torch_state(torch_model(hc, seed=12))
    back = engine.nnx_to_torch(engine.model_params(convert_state(state, cfg)), efficientnet_table(cfg), on_disk=False)
    assert list(back) == list(state), "export order differs from the state_dict order"
    assert_round_trip(back, state)


def test_missing_and_misshapen_keys_are_named():
    hc = hf_config("k353-w0.5-d1.2-pad5")
    cfg = EfficientNetConfig.from_hf(hc.to_dict())
    state = torch_state(transformers.AlignVisionModel(hc))
    running_var = state.pop("encoder.blocks.3.expansion.expand_bn.running_var")
    state["encoder.blocks.0.squeeze_excite.reduce.weight"] = np.zeros((3, 16, 1, 1), np.float32)
    with pytest.raises(engine.ConversionError, match=r"encoder\.blocks\.3\.expansion\.expand_bn\.running_var"):
        convert_state(state, cfg)
    state["encoder.blocks.3.expansion.expand_bn.running_var"] = running_var
    expected = r"squeeze_excite\.reduce\.weight: .* has \(3, 16, 1, 1\), the model expects \(4, 16, 1, 1\)"
    with pytest.raises(engine.ConversionError, match=expected):
        convert_state(state, cfg)


def test_config_round_trip_defaults_and_group_size():
    for hc in [transformers.AlignVisionConfig(), transformers.AlignConfig().vision_config, hf_config("k3375-max")]:
        d = hc.to_dict()
        assert EfficientNetConfig.from_hf(d).to_hf() == d, f"{d} changed in the round trip"
        assert EfficientNetConfig.from_hf(d).num_hidden_layers == d["num_hidden_layers"]
    ref = transformers.AlignVisionConfig().to_dict()
    ours = EfficientNetConfig()
    for f in dataclasses.fields(ours):
        if f.name not in ("extra", "bn_group_size", "scan_layers"):
            want = tuple(ref[f.name]) if isinstance(ref[f.name], list) else ref[f.name]
            assert getattr(ours, f.name) == want, f"default {f.name}: {getattr(ours, f.name)!r} != HF {ref[f.name]!r}"
    grouped = EfficientNetConfig(bn_group_size=16)
    assert grouped.to_hf()["bn_group_size"] == 16 and EfficientNetConfig.from_hf(grouped.to_hf()) == grouped
    assert "bn_group_size" not in EfficientNetConfig().to_hf()
    assert "scan_layers" not in EfficientNetConfig(scan_layers=True).to_hf(), "an altjax field in the HF dict"
    # Hashable despite the dict of extra keys and lists given in Python: the config is static module data.
    cfg = EfficientNetConfig(**CONFIGS["k353-w0.5-d1.2-pad5"], extra={"k": [1]})
    assert hash(nnx.graphdef(nnx.eval_shape(lambda: EfficientNet(cfg, rngs=nnx.Rngs(0)))))
    with pytest.raises(ValueError, match="one entry per stage"):
        EfficientNetConfig(kernel_sizes=(3, 5))
    base = CONFIGS["k353-w0.5-d1.2-pad5"]
    with pytest.raises(ValueError, match="input channels"):
        EfficientNet(EfficientNetConfig(**{**base, "in_channels": [32, 16, 40]}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="strides must be 1 or 2"):
        EfficientNet(EfficientNetConfig(**{**base, "strides": [1, 3, 2]}), rngs=nnx.Rngs(0))


def test_presets_block_counts_match_transformers():
    for name in EFFICIENTNET_PRESETS:
        cfg = efficientnet_config(name)
        hc = transformers.AlignVisionConfig(**{k: v for k, v in cfg.to_hf().items() if k != "num_hidden_layers"})
        assert cfg.num_hidden_layers == hc.num_hidden_layers == len(block_specs(cfg)), f"{name}: block count differs"


# b7 is the full-size test below; these three cover the other width roundings.
@pytest.mark.parametrize("name", ["b0", "b3", "b5"])
def test_presets_have_the_reference_keys_and_shapes(name):
    cfg = efficientnet_config(name)
    with torch.device("meta"):
        tm = transformers.AlignVisionModel(transformers.AlignVisionConfig(**cfg.to_hf()))
    shapes = engine.model_shapes(nnx.eval_shape(lambda: EfficientNet(cfg, rngs=nnx.Rngs(0))))
    # Empty arrays of the reference shapes: the engine checks every key and shape both ways.
    fake = {k: np.empty(tuple(v.shape), np.uint8) for k, v in tm.state_dict().items()}
    assert set(engine.torch_to_nnx(fake, efficientnet_table(cfg), shapes)) == set(shapes)


def test_b7_preset_is_the_hf_default_and_align_base():
    assert efficientnet_config("b7") == EfficientNetConfig()
    base = efficientnet_config("B7", image_size=289, hidden_dim=640)
    assert (base.image_size, base.hidden_dim, base.num_hidden_layers) == (289, 640, 55)
    with pytest.raises(ValueError, match="unknown EfficientNet preset"):
        efficientnet_config("b8")


def test_full_size_align_base_tower_matches():
    hc = transformers.AlignVisionConfig(image_size=289, hidden_dim=640)
    cfg = efficientnet_config("b7", image_size=289, hidden_dim=640)
    assert cfg.to_hf() == {k: v for k, v in hc.to_dict().items() if k in cfg.to_hf()}
    tm = torch_model(hc, seed=13).eval()
    x = images(2, 289, seed=14)
    with torch.no_grad():
        ref = tm(nchw(x))
    model = convert_state(torch_state(tm), cfg)
    del tm
    out = jitted(model, False)(x)
    assert out.last_hidden_state.shape == (2, 9, 9, 640)
    scale = float(np.max(np.abs(nhwc(ref.last_hidden_state))))
    hidden = assert_close(out.last_hidden_state, nhwc(ref.last_hidden_state), atol=1e-4, what="B7 last_hidden_state")
    pooled = assert_close(out.pooler_output, nhwc(ref.pooler_output), atol=1e-4, what="B7 pooler_output")
    print(f"B7 289px: pooler_output max diff {pooled:.2e}; last_hidden_state {hidden:.2e} (max |ref| {scale:.2f})")


def test_bf16_compute_is_close_to_fp32_reference():
    hc = hf_config("k353-w0.5-d1.2-pad5")
    cfg = EfficientNetConfig.from_hf(hc.to_dict())
    tm = torch_model(hc, seed=15).eval()
    x = images(3, 47, seed=16)
    with torch.no_grad():
        ref = tm(nchw(x)).pooler_output.numpy()
    model = convert_state(torch_state(tm), cfg, dtype=jnp.bfloat16)
    float_params = {v.dtype for k, v in engine.model_params(model).items() if not k.endswith("num_batches_tracked")}
    assert float_params == {np.dtype(np.float32)}, f"parameters must stay fp32, got {float_params}"
    out = jitted(model, False)(x)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    cos = float(np.min(cosine(out.pooler_output, ref)))
    assert cos >= 0.999, f"bf16 pooler_output cosine to the fp32 reference {cos:.5f} < 0.999"
    print(f"bf16: min cosine {cos:.6f}")


def test_random_initialisation_keeps_activations_alive_through_a_deep_tower():
    # With transformers' N(0, 0.02) conv init the activations of a random deep tower underflow and
    # the L2-normalised embedding is NaN (a random align-base gave NaN logits). With EfficientNet's
    # He fan-out init they still shrink in eval mode (SE gates ~0.5, BatchNorm running stats (0, 1)
    # do not renormalise) but stay far from underflow: B3 gives norms ~4e-4, versus ~4e-13 when the
    # depthwise kernels take JAX's fan-out (k*k*C) instead of TF's (k*k).
    config = efficientnet_config("b3", image_size=64)
    model = nnx.jit(lambda: EfficientNet(config, rngs=nnx.Rngs(0)))()
    pixels = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    pooled = np.asarray(nnx.jit(lambda m, x: m(x).pooler_output)(model, pixels))
    assert np.all(np.isfinite(pooled)), "random-init pooled output has non-finite values"
    norms = np.linalg.norm(pooled, axis=-1)
    assert np.all(norms > 1e-5), f"random-init pooled output nearly vanishes: norms {norms}"
