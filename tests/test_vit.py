"""The CLIP vision tower against transformers' CLIPVisionModel / AltCLIPVisionModel, random weights.

Tolerances (float32): hidden states and pooled output 1e-5 absolute at tiny sizes (values are O(1):
LayerNorm inputs and outputs), 1e-4 at full ViT-L/14 size (24 layers accumulate rounding);
PyTorch's bicubic resize 1.5e-6 on unit-normal grids (3 float32 ulps of the largest values); gradients 1e-4 relative to
the largest reference gradient of each tensor; bf16 compute: cosine >= 0.999 to the fp32 reference;
conversions bit-exact.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from altjax.model_io import engine
from altjax.model_io.pretrained import ALTJAX_ONLY
from altjax.models.vit import CLIPVision, CLIPVisionConfig, clip_vision_table, torch_bicubic_matrix, torch_bicubic_resize
from helpers import assert_close, assert_rel_close, assert_round_trip, cosine, from_torch_state, torch_state

# Tiny configurations: patch sizes 4, 8 and 7 (28 px), head widths 8 and 12, one to three layers,
# odd MLP widths, exact-erf GELU instead of quick_gelu, a single-channel input, another LN eps.
CONFIGS = {
    "h32-heads4-l2-p4-img16": dict(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37, image_size=16, patch_size=4
    ),
    "h48-heads6-l3-p8-img32-gelu": dict(
        hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64, image_size=32, patch_size=8,
        hidden_act="gelu",
    ),
    "h24-heads2-l1-p7-img28-c1-eps1e-6": dict(
        hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=31, image_size=28, patch_size=7,
        num_channels=1, layer_norm_eps=1e-6,
    ),
}


def hf_config(name, **overrides):
    return transformers.CLIPVisionConfig(**{**CONFIGS[name], **overrides})


def randomise_(module, seed):
    """Random weights giving O(1) activations; LayerNorm affine and the embeddings included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "class_embedding" in name or "position_embedding" in name:
                p.copy_(0.5 * noise)
            else:  # Linear (out, in) and the patch conv (D, C, P, P): unit-variance outputs
                p.copy_(noise / p[0].numel() ** 0.5)
    return module


def images(cfg, batch, size, seed):
    """NCHW torch images and the same images NHWC for altjax."""
    x = torch.randn((batch, cfg.num_channels, *size), generator=torch.Generator().manual_seed(seed))
    return x, x.numpy().transpose(0, 2, 3, 1)


convert_state = functools.partial(from_torch_state, CLIPVision, table=clip_vision_table)


def setup(name, seed, **overrides):
    hc = hf_config(name, **overrides)
    cfg = CLIPVisionConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.CLIPVisionModel(hc), seed=seed).eval()
    return cfg, tm, convert_state(torch_state(tm), cfg)


def jitted(module, interpolate_pos_encoding=False):
    """A jitted forward of an NNX module (split/merge) with ``output_hidden_states=True``."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def forward(state, pixels):
        return nnx.merge(graphdef, state)(
            pixels, interpolate_pos_encoding=interpolate_pos_encoding, output_hidden_states=True
        )

    return lambda pixels: forward(state, jnp.asarray(pixels))


def compare_outputs(out, ref, what, atol=1e-5):
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=atol, what=f"{what} last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, atol=atol, what=f"{what} pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states), f"{what}: number of hidden states differs"
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b, atol=atol, what=f"{what} hidden_states[{i}]")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_matches_clip_vision_model(name):
    cfg, tm, model = setup(name, seed=1)
    batch = {"h32-heads4-l2-p4-img16": 2, "h48-heads6-l3-p8-img32-gelu": 3}.get(name, 3)
    x, pixels = images(cfg, batch, (cfg.image_size, cfg.image_size), seed=2)
    with torch.no_grad():
        ref = tm(pixel_values=x, output_hidden_states=True)
    out = jitted(model)(pixels)
    compare_outputs(out, ref, name)
    # The pooled output is the post-normed class token; the last hidden state is not post-normed.
    np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]), np.asarray(out.last_hidden_state))


def test_altclip_vision_model_is_the_same_network():
    name = "h48-heads6-l3-p8-img32-gelu"
    hc = transformers.AltCLIPVisionConfig(**CONFIGS[name])
    cfg = CLIPVisionConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AltCLIPVisionModel(hc), seed=3).eval()
    x, pixels = images(cfg, 2, (32, 32), seed=4)
    with torch.no_grad():
        ref = tm(pixel_values=x, output_hidden_states=True)
    compare_outputs(jitted(convert_state(torch_state(tm), cfg))(pixels), ref, f"AltCLIPVisionModel {name}")


# (config, image height, width): larger, non-square, smaller (the grid is downsampled), a
# non-square image with as many patches as the table (the reference still resizes it), and an
# image that is not a multiple of the patch size but gives the table's square grid (no resize).
INTERPOLATED = [
    ("h32-heads4-l2-p4-img16", 24, 24),
    ("h32-heads4-l2-p4-img16", 20, 36),
    ("h32-heads4-l2-p4-img16", 8, 32),
    ("h48-heads6-l3-p8-img32-gelu", 56, 40),
    ("h48-heads6-l3-p8-img32-gelu", 16, 24),
    ("h24-heads2-l1-p7-img28-c1-eps1e-6", 49, 35),
    ("h24-heads2-l1-p7-img28-c1-eps1e-6", 31, 31),
]


@pytest.mark.parametrize("name,height,width", INTERPOLATED)
def test_interpolated_position_encoding(name, height, width):
    cfg, tm, model = setup(name, seed=5)
    x, pixels = images(cfg, 2, (height, width), seed=6)
    with torch.no_grad():
        ref = tm(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
    compare_outputs(jitted(model, interpolate_pos_encoding=True)(pixels), ref, f"{name} at {height}x{width}")


def test_interpolation_at_the_model_size_changes_nothing():
    cfg, _, model = setup("h32-heads4-l2-p4-img16", seed=7)
    _, pixels = images(cfg, 2, (16, 16), seed=8)
    a, b = jitted(model)(pixels), jitted(model, interpolate_pos_encoding=True)(pixels)
    np.testing.assert_array_equal(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state))


@pytest.mark.parametrize("size", [(20, 20), (16, 20), (17, 16)])
def test_other_image_sizes_need_interpolation(size):
    cfg, _, model = setup("h32-heads4-l2-p4-img16", seed=9)
    _, pixels = images(cfg, 1, size, seed=10)
    with pytest.raises(ValueError, match=rf"Input image size \({size[0]}\*{size[1]}\) doesn't match model \(16\*16\)"):
        model(jnp.asarray(pixels))


# (input grid, output grid): up, down, mixed and non-square, a 1x1 grid, identity.
RESIZES = [((4, 4), (7, 3)), ((7, 7), (3, 5)), ((16, 16), (5, 9)), ((3, 5), (11, 2)), ((1, 1), (3, 3)),
           ((6, 6), (6, 6)), ((16, 16), (37, 23))]


@pytest.mark.parametrize("grid,size", RESIZES)
def test_bicubic_resize_matches_torch_interpolate(grid, size):
    g = torch.randn((1, 5, *grid), generator=torch.Generator().manual_seed(11))
    ref = torch.nn.functional.interpolate(g, size=size, mode="bicubic", align_corners=False)[0].numpy()
    ours = torch_bicubic_resize(jnp.asarray(g[0].numpy().transpose(1, 2, 0)), size)
    assert_close(np.asarray(ours).transpose(2, 0, 1), ref, atol=1.5e-6, what=f"bicubic {grid} -> {size}")


def test_bicubic_differs_from_jax_image_resize():
    """Why the resize is hand-written: jax.image.resize's cubic (a=-0.5, antialiased) is another filter."""
    g = jnp.asarray(np.random.default_rng(12).normal(size=(16, 16, 3)), jnp.float32)
    for size in [(24, 24), (5, 9)]:
        gap = float(jnp.max(jnp.abs(jax.image.resize(g, (*size, 3), "cubic") - torch_bicubic_resize(g, size))))
        assert gap > 1e-2, f"jax.image.resize is unexpectedly close to PyTorch's bicubic at {size} ({gap:.1e})"
    # Rows of the weight matrix are a partition of unity, border taps merged.
    np.testing.assert_allclose(torch_bicubic_matrix(5, 11).sum(1), 1.0, atol=1e-6)


def check_gradients(grads, ref_grads, *, what):
    """Every gradient within 1e-4 of its tensor's largest reference gradient.

    The key-projection bias is the exception: its true gradient is zero (a constant added to every
    key logit of a query leaves the softmax unchanged), so both sides are rounding noise and are
    measured against the largest gradient of the whole model instead.
    """
    assert set(grads) == set(ref_grads), f"gradient key sets differ: {sorted(set(grads) ^ set(ref_grads))}"
    model_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for key, g in ref_grads.items():
        if key.endswith("self_attn.k_proj.bias"):
            for side, v in (("altjax", grads[key]), ("torch", g)):
                noise = float(np.max(np.abs(v))) / model_scale
                assert noise <= 1e-4, f"{what} {side} gradient of {key} (exactly 0 in theory) is {noise:.3e} of the largest"
            continue
        assert_rel_close(grads[key], g, rtol=1e-4, what=f"{what} gradient of {key}")


@pytest.mark.parametrize(
    "name,size", [("h32-heads4-l2-p4-img16", (16, 16)), ("h48-heads6-l3-p8-img32-gelu", (40, 24))]
)
def test_train_mode_outputs_and_gradients_match(name, size):
    interpolate = size != (CONFIGS[name]["image_size"],) * 2
    cfg, tm, model = setup(name, seed=13)
    tm.train()
    model.train()
    x, pixels = images(cfg, 3, size, seed=14)
    rng = np.random.default_rng(15)
    ref = tm(pixel_values=x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
    r_pool = rng.normal(size=ref.pooler_output.shape).astype(np.float32)
    r_hidden = rng.normal(size=ref.last_hidden_state.shape).astype(np.float32)
    ((ref.pooler_output * torch.tensor(r_pool)).sum() + (ref.last_hidden_state * torch.tensor(r_hidden)).sum()).backward()
    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_out(params, pixels):
        out = nnx.merge(graphdef, params, rest)(pixels, interpolate_pos_encoding=interpolate, output_hidden_states=True)
        return jnp.sum(out.pooler_output * r_pool) + jnp.sum(out.last_hidden_state * r_hidden), out

    (_, out), grads = jax.value_and_grad(loss_and_out, has_aux=True)(params, jnp.asarray(pixels))
    compare_outputs(out, ref, f"{name} train at {size}")
    flat = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    check_gradients(engine.nnx_to_torch(flat, clip_vision_table(cfg), on_disk=False), ref_grads, what=f"{name} at {size}")


def test_train_mode_attention_dropout_is_active_and_eval_restores():
    cfg, _, model = setup("h32-heads4-l2-p4-img16", seed=16, attention_dropout=0.2)
    _, pixels = images(cfg, 2, (16, 16), seed=17)
    before = jitted(model)(pixels).last_hidden_state
    model.train()
    dropped = jitted(model)(pixels).last_hidden_state
    model.eval()
    after = jitted(model)(pixels).last_hidden_state
    assert float(jnp.max(jnp.abs(dropped - before))) > 1e-2, "train() did not turn attention dropout on"
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg="eval() did not turn dropout off")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_exact(name):
    hc = hf_config(name)
    cfg = CLIPVisionConfig.from_hf(hc.to_dict())
    state = torch_state(randomise_(transformers.CLIPVisionModel(hc), seed=18))
    model = convert_state(state, cfg)
    back = engine.nnx_to_torch(engine.model_params(model), clip_vision_table(cfg), on_disk=False)
    assert_round_trip(back, state)


def test_stale_position_ids_buffer_is_ignored():
    name = "h32-heads4-l2-p4-img16"
    cfg = CLIPVisionConfig.from_hf(hf_config(name).to_dict())
    state = torch_state(randomise_(transformers.CLIPVisionModel(hf_config(name)), seed=19))
    stale = {**state, "embeddings.position_ids": np.arange(cfg.num_positions)[None]}
    a, b = engine.model_params(convert_state(stale, cfg)), engine.model_params(convert_state(state, cfg))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs when a position_ids buffer is present")


@pytest.mark.parametrize("name", ["h32-heads4-l2-p4-img16", "h48-heads6-l3-p8-img32-gelu"])
def test_bfloat16_compute_is_close(name):
    cfg, tm, _ = setup(name, seed=20)
    x, pixels = images(cfg, 3, (cfg.image_size, cfg.image_size), seed=21)
    with torch.no_grad():
        ref = tm(pixel_values=x)
    model = convert_state(torch_state(tm), cfg, dtype=jnp.bfloat16)
    out = jitted(model)(pixels)
    assert out.pooler_output.dtype == jnp.bfloat16, f"compute dtype is {out.pooler_output.dtype}, not bfloat16"
    assert all(v.dtype == jnp.float32 for v in engine.model_params(model).values()), "parameters must stay float32"
    for field in ("pooler_output", "last_hidden_state"):
        cos = cosine(np.asarray(getattr(out, field), np.float32), getattr(ref, field))
        assert cos.min() >= 0.999, f"{name} bf16 {field}: min cosine {cos.min():.5f} < 0.999"


def test_config_round_trip_and_defaults():
    for hc in [transformers.CLIPVisionConfig(), transformers.AltCLIPVisionConfig(), hf_config("h48-heads6-l3-p8-img32-gelu")]:
        d = hc.to_dict()
        assert CLIPVisionConfig.from_hf(d).to_hf() == d, f"{type(hc).__name__} dict changed in the round trip"
    for hf_class in (transformers.CLIPVisionConfig, transformers.AltCLIPVisionConfig):
        ref = hf_class().to_dict()
        ours = CLIPVisionConfig()
        # scan_layers is altjax's own (how the layers run), never written to an HF config.
        own = {f for f, field in ours.__dataclass_fields__.items() if field.metadata.get(ALTJAX_ONLY)}
        assert own == {"scan_layers"}, f"altjax-only fields {sorted(own)}"
        for f in ours.__dataclass_fields__:
            if f != "extra" and f not in own:
                assert getattr(ours, f) == ref[f], f"default {f}: {getattr(ours, f)!r} != {hf_class.__name__} {ref[f]!r}"
        assert set(ours.__dataclass_fields__) - {"extra"} - own == set(hf_class.__annotations__) - {
            "model_type", "base_config_key"
        }, f"CLIPVisionConfig fields differ from {hf_class.__name__}'s"
    back = transformers.CLIPVisionConfig.from_dict(CLIPVisionConfig(**CONFIGS["h32-heads4-l2-p4-img16"]).to_hf())
    assert back.hidden_size == 32 and back.patch_size == 4 and back.model_type == "clip_vision_model"
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPVisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="must be an int"):
        CLIPVisionConfig(image_size=(224, 224))


def test_full_size_vit_l14_matches(capsys):
    """CLIP ViT-L/14 at 224 px (AltCLIP's image tower), transformers' own random init, batch 2."""
    hc = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=768,
    )
    cfg = CLIPVisionConfig.from_hf(hc.to_dict())
    torch.manual_seed(22)
    tm = transformers.CLIPVisionModel(hc).eval()
    x, pixels = images(cfg, 2, (224, 224), seed=23)
    start = time.perf_counter()
    with torch.no_grad():
        ref = tm(pixel_values=x)
    torch_s = time.perf_counter() - start
    model = convert_state(torch_state(tm), cfg)
    del tm
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, pixels: nnx.merge(graphdef, state)(pixels))
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, jnp.asarray(pixels)))
    jax_s = time.perf_counter() - start
    pooled = assert_close(out.pooler_output, ref.pooler_output, atol=1e-4, what="ViT-L/14 pooler_output")
    hidden = assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-4, what="ViT-L/14 last_hidden_state")
    with capsys.disabled():
        print(f"\nViT-L/14: pooler {pooled:.2e}, last_hidden_state {hidden:.2e}; torch {torch_s:.1f}s, jax (jit incl.) {jax_s:.1f}s")
