"""AlignModel against transformers' AlignModel with random weights and random BatchNorm statistics.

Tolerances (float32 unless said): L2-normalised embeddings and text hidden states 1e-5 absolute
(1e-4 at full size, where 55 EfficientNet blocks and 12 BERT layers accumulate rounding); logits
1e-4 / temperature absolute (cosines scaled by 1 / temperature, so the cosine error times that
scale); loss likewise, since |d loss| <= max |d logit|; vision tower outputs, unnormalised features
and BatchNorm statistics 1e-5 relative to their largest value; gradients 1e-4 relative to the largest reference gradient of each tensor; conversions
bit-exact; bfloat16 compute: cosine to the float32 reference >= 0.999.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.models.align.modeling_align import round_filters

from altjax.model_io import engine
from altjax.model_io.directories import CheckpointError
from altjax.models.align import AlignConfig, AlignModel, align_table
from altjax.models.efficientnet import block_specs
from helpers import (
    assert_close,
    assert_rel_close,
    assert_round_trip,
    cosine,
    from_torch_state,
    torch_inputs,
    torch_state,
)

TEXT = dict(vocab_size=99, max_position_embeddings=40)
# Two tiny configurations: different widths, depths, kernels, stride patterns and image sizes; the
# second also has a depthwise_padding block (symmetric stride-2 padding) and width/depth scaling.
TINY = {
    "tiny-a-33px": dict(
        image_size=33,
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        vision=dict(
            width_coefficient=1.0,
            depth_coefficient=1.0,
            kernel_sizes=[3, 3, 5],
            in_channels=[32, 16, 24],
            out_channels=[16, 24, 40],
            strides=[1, 2, 2],
            num_block_repeats=[1, 2, 1],
            expand_ratios=[1, 6, 6],
        ),
    ),
    "tiny-b-47px": dict(
        image_size=47,
        text=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=61),
        vision=dict(
            width_coefficient=1.25,
            depth_coefficient=1.5,
            kernel_sizes=[5, 3, 3, 5],
            in_channels=[32, 16, 24, 24],
            out_channels=[16, 24, 24, 32],
            strides=[2, 1, 2, 2],
            num_block_repeats=[1, 1, 2, 1],
            expand_ratios=[1, 4, 6, 3],
            depthwise_padding=[4],
        ),
    ),
}
TRAIN = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(name, *, train=False, temperature=0.7):
    spec = TINY[name]
    vision = transformers.AlignVisionConfig(
        image_size=spec["image_size"], hidden_dim=64, **spec["vision"], **(dict(drop_connect_rate=0.0) if train else {})
    )
    text = transformers.AlignTextConfig(**TEXT, **spec["text"], **(TRAIN if train else {}))
    return transformers.AlignConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=round_filters(vision, vision.out_channels[-1]),
        temperature_init_value=temperature,
    )


def randomise_(model, seed):
    """Random weights giving O(1) activations, random BatchNorm statistics, counters set to 7."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "temperature":
                continue
            if "LayerNorm.weight" in name or (p.ndim == 1 and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embeddings" in name and p.ndim == 2:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return model


def make_inputs(cfg, image_size, batch=3, length=9, seed=0):
    """Right-padded token ids (pad 0) with masks and random token types; NHWC pixels in [-1, 1]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.text_config.vocab_size, (batch, length))
    lengths = np.linspace(length, 3, batch).astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    pixels = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
    text = dict(
        input_ids=np.where(mask == 1, ids, 0),
        attention_mask=mask,
        token_type_ids=rng.integers(0, cfg.text_config.type_vocab_size, (batch, length)),
    )
    return text, pixels


convert = functools.partial(from_torch_state, AlignModel)


def jitted_forward(model):
    """Jitted ``model(..., return_loss=True)`` returning (output, state after the call)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        m = nnx.merge(graphdef, state)
        out = m(**inputs, return_loss=True)
        return out, nnx.state(m)

    return lambda **inputs: forward(state, {k: jnp.asarray(v) for k, v in inputs.items()})


def check_outputs(out, ref, temperature, *, what, atol=1e-5):
    scale = 1.0 / temperature
    assert_close(out.image_embeds, ref.image_embeds, atol=atol, what=f"{what} image_embeds")
    assert_close(out.text_embeds, ref.text_embeds, atol=atol, what=f"{what} text_embeds")
    assert_close(out.logits_per_text, ref.logits_per_text, atol=1e-4 * scale, what=f"{what} logits_per_text")
    assert_close(out.logits_per_image, ref.logits_per_image, atol=1e-4 * scale, what=f"{what} logits_per_image")
    if ref.loss is not None:
        assert_close(out.loss, ref.loss, atol=1e-4 * scale, what=f"{what} loss")
    vision_ref = ref.vision_model_output
    assert_rel_close(out.vision_model_output.pooler_output, vision_ref.pooler_output, rtol=1e-5, what=f"{what} vision pooler_output")
    assert_rel_close(
        out.vision_model_output.last_hidden_state,
        vision_ref.last_hidden_state.permute(0, 2, 3, 1),
        rtol=1e-5,
        what=f"{what} vision last_hidden_state (NHWC)",
    )
    text_ref = ref.text_model_output
    assert_close(out.text_model_output.last_hidden_state, text_ref.last_hidden_state, atol=atol, what=f"{what} text last_hidden_state")
    assert_close(out.text_model_output.pooler_output, text_ref.pooler_output, atol=atol, what=f"{what} text pooler_output")


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    """A random tiny torch AlignModel (eval), its converted NNX model, inputs and torch outputs."""
    name = request.param
    hc = hf_config(name)
    tm = randomise_(transformers.AlignModel(hc), seed=1).eval()
    cfg = AlignConfig.from_hf(hc.to_dict())
    text, pixels = make_inputs(cfg, TINY[name]["image_size"], seed=2)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    state = torch_state(tm)
    return dict(name=name, hc=hc, tm=tm, cfg=cfg, state=state, model=convert(state, cfg), text=text, pixels=pixels, ref=ref)


def test_eval_matches_torch(tiny):
    out, _ = jitted_forward(tiny["model"])(**tiny["text"], pixel_values=tiny["pixels"])
    check_outputs(out, tiny["ref"], tiny["cfg"].temperature_init_value, what=f"{tiny['name']} eval")


def test_features_nchw_pixels_and_default_text_inputs(tiny):
    """get_*_features (unnormalised, normalising to the embeddings), NCHW pixels, text without
    attention_mask / token_type_ids."""
    graphdef, state = nnx.split(tiny["model"])
    image_features = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))
    text_features = jax.jit(lambda s, t: nnx.merge(graphdef, s).get_text_features(**t))
    d = tiny["cfg"].projection_dim
    image = image_features(state, tiny["pixels"])
    text = text_features(state, tiny["text"])
    assert image.shape == (3, d) and text.shape == (3, d), f"feature shapes {image.shape}, {text.shape} != (3, {d})"
    with torch.no_grad():
        ref_text = tiny["tm"].get_text_features(**{k: torch.tensor(v) for k, v in tiny["text"].items()}).pooler_output
        ref_image = tiny["tm"].get_image_features(torch_inputs(tiny["text"], tiny["pixels"])["pixel_values"]).pooler_output
    assert_rel_close(text, ref_text, rtol=1e-5, what="get_text_features (unnormalised)")
    assert_rel_close(image, ref_image, rtol=1e-5, what="get_image_features (unnormalised)")
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    assert_close(unit(np.asarray(image)), tiny["ref"].image_embeds, atol=1e-5, what="normalised get_image_features")
    assert_close(unit(np.asarray(text)), tiny["ref"].text_embeds, atol=1e-5, what="normalised get_text_features")

    nchw = np.ascontiguousarray(tiny["pixels"].transpose(0, 3, 1, 2))
    assert_rel_close(image_features(state, nchw), ref_image, rtol=1e-5, what="get_image_features of NCHW pixels")

    ids = tiny["text"]["input_ids"][:, :3]  # every row has >= 3 real tokens: nothing to mask
    with torch.no_grad():
        ref_text = tiny["tm"].get_text_features(input_ids=torch.tensor(ids)).pooler_output
    assert_rel_close(text_features(state, {"input_ids": ids}), ref_text, rtol=1e-5, what="get_text_features, ids only")


def test_bf16_compute_is_close(tiny):
    model = convert(tiny["state"], tiny["cfg"], dtype=jnp.bfloat16)
    out, _ = jitted_forward(model)(**tiny["text"], pixel_values=tiny["pixels"])
    for field in ("image_embeds", "text_embeds"):
        worst = float(np.min(cosine(getattr(out, field), getattr(tiny["ref"], field))))
        assert worst >= 0.999, f"{tiny['name']} bf16 {field}: lowest cosine to fp32 torch {worst:.6f} < 0.999"
    params = {k: v for k, v in engine.model_variables(model).items() if not k.endswith("num_batches_tracked")}
    assert all(v.get_value().dtype == jnp.float32 for v in params.values()), "bf16 model has non-fp32 parameters"


def test_round_trip_is_bit_exact(tiny):
    state = tiny["state"]
    back = engine.nnx_to_torch(engine.model_params(tiny["model"]), align_table(tiny["cfg"]))
    assert_round_trip(back, state)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", list(TINY))
def test_train_mode_outputs_stats_and_gradients(name, scan):
    """Train mode against transformers, BERT's layers unrolled or stacked and scanned."""
    hc = hf_config(name, train=True, temperature=0.3)
    tm = randomise_(transformers.AlignModel(hc), seed=3).train()
    cfg = AlignConfig.from_hf(hc.to_dict())
    tag = f"{name} {'scanned' if scan else 'unrolled'}"
    cfg = dataclasses.replace(cfg, text_config=dataclasses.replace(cfg.text_config, scan_layers=scan))
    model = convert(torch_state(tm), cfg)
    model.train()
    text, pixels = make_inputs(cfg, TINY[name]["image_size"], batch=4, length=11, seed=4)
    ref = tm(**torch_inputs(text, pixels), return_loss=True)
    ref.loss.backward()
    # The tanh pooler does not feed the ALIGN loss: torch leaves its grad None, altjax gives zeros.
    ref_grads = {k: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy() for k, p in tm.named_parameters()}
    ref_state = torch_state(tm)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_fn(params, rest, inputs):
        m = nnx.merge(graphdef, params, rest)
        out = m(**inputs, return_loss=True)
        return out.loss, (out, nnx.state(m, nnx.BatchStat))

    inputs = {k: jnp.asarray(v) for k, v in text.items()} | {"pixel_values": jnp.asarray(pixels)}
    (_, (out, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, inputs)
    with torch.no_grad():
        check_outputs(out, ref, 0.3, what=f"{tag} train")

    table = align_table(cfg)
    new_stats = engine.nnx_to_torch(flat(stats) | flat(params), table)
    bn_keys = [k for k in ref_state if k.endswith(("running_mean", "running_var"))]
    assert bn_keys, "no BatchNorm statistics found"
    for k in bn_keys:
        assert_rel_close(new_stats[k], ref_state[k], rtol=1e-5, what=f"{tag} updated {k}")

    zeros = {k: np.zeros_like(v) for k, v in flat(stats).items()}
    torch_grads = engine.nnx_to_torch(flat(grads) | zeros, table)
    model_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    zero = zero_gradient_keys(cfg)
    for key, g in ref_grads.items():
        if key in zero:
            # Both sides are rounding noise around an exact 0: measured against the largest gradient.
            for side, v in (("altjax", torch_grads[key]), ("torch", g)):
                noise = float(np.max(np.abs(v))) / model_scale
                assert noise <= 1e-4, f"{tag} {side} gradient of {key} is {noise:.3e} of the largest, expected ~0"
            continue
        assert_rel_close(torch_grads[key], g, rtol=1e-4, what=f"{tag} gradient of {key}")
    assert "temperature" in ref_grads and abs(float(ref_grads["temperature"])) > 0


def zero_gradient_keys(cfg):
    """Parameters whose exact gradient is 0 in training mode, so that a relative check is meaningless.

    * Attention key biases: a constant added to all key logits of a query cancels in the softmax.
    * A block's ``project_bn.bias`` (no activation follows it) when every consumer of the block's
      output removes per-channel constants: the next block's 1x1 expansion conv feeds a BatchNorm
      using batch statistics, and if that block adds its input back, its own output must be such a
      block output again. Found from the block layout, last block first.
    """
    keys = {f"text_model.encoder.layer.{i}.attention.self.key.bias" for i in range(cfg.text_config.num_hidden_layers)}
    specs = block_specs(cfg.vision_config)
    constant_free = False  # whether block k+1's output has this property; the last feeds the pooler
    for k in range(len(specs) - 2, -1, -1):
        nxt = specs[k + 1]
        residual = nxt.stride == 1 and not nxt.id_skip
        constant_free = nxt.expand and (not residual or constant_free)
        if constant_free:
            keys.add(f"vision_model.encoder.blocks.{k}.projection.project_bn.bias")
    return keys


def flat(state):
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("tiny", ["tiny-b-47px"], indirect=True)
def test_from_pretrained_reads_a_transformers_directory(tiny, tmp_path):
    tiny["tm"].save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = AlignModel.from_pretrained(tmp_path)
    assert model.config.to_hf() == json.loads((tmp_path / "config.json").read_text()), "config.json not read back as written"
    params, expected = engine.model_params(model), engine.model_params(tiny["model"])
    assert set(params) == set(expected), f"parameter sets differ: {sorted(set(params) ^ set(expected))}"
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v, err_msg=f"from_pretrained {k} differs from the state-dict conversion")
    out, _ = jitted_forward(model)(**tiny["text"], pixel_values=tiny["pixels"])
    check_outputs(out, tiny["ref"], tiny["cfg"].temperature_init_value, what="from_pretrained")


def test_bad_checkpoints_are_reported(tiny, tmp_path):
    tiny["tm"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    good = dict(weights)

    del weights["text_model.encoder.layer.1.attention.self.value.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(engine.ConversionError, match=r"missing keys \(1\): text_model\.encoder\.layer\.1\.attention\.self\.value\.bias"):
        AlignModel.from_pretrained(tmp_path)

    weights = dict(good)
    weights["text_projection.weight"] = weights["text_projection.weight"][:, :-1].copy()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    d, h = tiny["cfg"].projection_dim, tiny["cfg"].text_config.hidden_size
    with pytest.raises(engine.ConversionError, match=rf"text_projection\.weight: .* has \({d}, {h - 1}\), the model expects \({d}, {h}\)"):
        AlignModel.from_pretrained(tmp_path)

    # Old checkpoints carry the non-persistent id buffers and LayerNorm.gamma/beta: accepted.
    weights = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in good.items()}
    weights["text_model.embeddings.position_ids"] = np.arange(40, dtype=np.int64)[None]
    weights["text_model.embeddings.token_type_ids"] = np.zeros((1, 40), np.int64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    params = engine.model_params(AlignModel.from_pretrained(tmp_path))
    expected = engine.model_params(tiny["model"])
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v, err_msg=f"{k} differs when loaded from a legacy checkpoint")

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="altclip")))
    with pytest.raises(CheckpointError, match=r"model_type is 'altclip', expected 'align'"):
        AlignModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not an ALIGN config: model_type is 'altclip', expected 'align'"):
        AlignConfig.from_hf(dict(config, model_type="altclip"))


def test_config_round_trip_and_presets():
    for hc in [transformers.AlignConfig(), hf_config("tiny-a-33px"), hf_config("tiny-b-47px", train=True)]:
        d = hc.to_dict()
        assert AlignConfig.from_hf(d).to_hf() == d, "AlignConfig dict changed in the round trip"
        on_disk = json.loads(json.dumps(d))  # as config.json holds it (id2label keys become strings)
        assert AlignConfig.from_hf(on_disk).to_hf() == on_disk, "JSON-loaded dict changed in the round trip"

    base = AlignConfig.from_preset("align-base")
    hf_base = transformers.AlignConfig(
        text_config=transformers.AlignTextConfig().to_dict(),
        vision_config=transformers.AlignVisionConfig(image_size=289, hidden_dim=640, depthwise_padding=[]).to_dict(),
        projection_dim=640,
    ).to_dict()
    ours = base.to_hf()
    for part in ("text_config", "vision_config"):
        for k, v in ours[part].items():
            assert hf_base[part].get(k) == v, f"align-base {part}.{k}: {v!r} != transformers {hf_base[part].get(k)!r}"
    assert ours["projection_dim"] == 640 and ours["model_type"] == "align"
    # What the preset writes is a config transformers builds an identical model from.
    assert transformers.AlignConfig(**ours).to_dict()["vision_config"]["num_hidden_layers"] == 55
    with pytest.raises(ValueError, match="unknown ALIGN preset"):
        AlignConfig.from_preset("align-huge")


def test_tiny_preset_matches_torch():
    cfg = AlignConfig.from_preset("align-tiny")
    hc = transformers.AlignConfig(**cfg.to_hf())
    tm = transformers.AlignModel(hc).eval()  # transformers' own initialisation
    assert set(torch_state(tm)) == {r.torch for r in align_table(cfg).rows}, "align-tiny table and transformers keys differ"
    model = convert(torch_state(tm), cfg)
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, batch=2, length=8, seed=5)
    forward = jitted_forward(model)
    out, _ = jax.block_until_ready(forward(**text, pixel_values=pixels))
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    check_outputs(out, ref, cfg.temperature_init_value, what="align-tiny")


def test_random_initialisation():
    # A minimal model (stem + one block, one text layer): eager initialisation compiles one op per shape.
    cfg = AlignConfig.from_hf(
        transformers.AlignConfig(
            text_config=dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8),
            vision_config=dict(
                width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=[3], in_channels=[32], out_channels=[16],
                strides=[1], num_block_repeats=[1], expand_ratios=[1],
            ),
            projection_dim=16,
            temperature_init_value=0.5,
        ).to_dict()
    )
    params = engine.model_params(AlignModel(cfg, rngs=nnx.Rngs(3)))
    assert all(v.dtype == np.float32 for k, v in params.items() if not k.endswith("num_batches_tracked")), "parameters are not all float32"
    assert params["temperature"].shape == () and params["temperature"] == 0.5, f"temperature {params['temperature']}"
    assert not np.any(params["text_projection.bias"]), "text_projection bias is not initialised to 0"
    # xavier_uniform on (8 -> 16), as transformers: U(-b, b) with b = sqrt(6 / (8 + 16)) = 0.5.
    bound = float(np.max(np.abs(params["text_projection.kernel"])))
    assert 0.35 < bound <= 0.5, f"text_projection init: max |w| {bound} for the bound 0.5"
    variances = [k for k in params if k.endswith(".var")]
    assert variances and all(np.all(params[k] == 1) for k in variances), "BatchNorm running variances do not start at 1"
    with pytest.raises(ValueError, match="projection_dim 8 must equal the vision tower's output channels 16"):
        AlignModel(dataclasses.replace(cfg, projection_dim=8))


@pytest.fixture(scope="module")
def full_size():
    """align-base at batch 2 (289 px, text length 16 with padding), random weights and BN stats."""
    cfg = AlignConfig.from_preset("align-base")
    hc = transformers.AlignConfig(**dict(cfg.to_hf(), temperature_init_value=0.05))
    torch.manual_seed(0)
    tm = randomise_(transformers.AlignModel(hc), seed=6).eval()
    cfg = AlignConfig.from_hf(hc.to_dict())
    text, pixels = make_inputs(cfg, 289, batch=2, length=16, seed=7)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    state = torch_state(tm)
    del tm
    return dict(cfg=cfg, state=state, text=text, pixels=pixels, ref=ref)


def test_full_size_fp32_matches(full_size):
    out, _ = jitted_forward(convert(full_size["state"], full_size["cfg"]))(**full_size["text"], pixel_values=full_size["pixels"])
    check_outputs(out, full_size["ref"], 0.05, what="align-base fp32", atol=1e-4)


def test_full_size_bf16_is_close(full_size):
    model = convert(full_size["state"], full_size["cfg"], dtype=jnp.bfloat16)
    out, _ = jitted_forward(model)(**full_size["text"], pixel_values=full_size["pixels"])
    for field in ("image_embeds", "text_embeds"):
        worst = float(np.min(cosine(getattr(out, field), getattr(full_size["ref"], field))))
        assert worst >= 0.999, f"align-base bf16 {field}: lowest cosine to fp32 torch {worst:.6f} < 0.999"
