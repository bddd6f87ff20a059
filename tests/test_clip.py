"""CLIPModel against transformers' CLIPModel with random weights, and its text-teacher view.

Tolerances (float32 unless said): L2-normalised embeddings and unnormalised features 1e-5 absolute
(O(1) values); logits and loss 1e-5 * exp(logit_scale) absolute (cosines scaled by
exp(logit_scale), and |d loss| <= max |d logit|); tower outputs 1e-5 relative to their largest
reference value (the vision residual stream reaches ~16 at full size, where float32 spacing is
~2e-6); gradients 1e-4 relative to the largest reference gradient of each tensor; conversions and
checkpoint round trips bit-exact; bfloat16 compute: cosine to the float32 reference >= 0.999.
"""
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
from transformers.initialization import no_init_weights

from altjax.model_io import engine
from altjax.model_io.directories import CheckpointError
from altjax.models.clip import CLIPConfig, CLIPModel, clip_table
from altjax.models.clip_text import CLIPTextTeacher
from helpers import (
    assert_close,
    assert_rel_close,
    assert_round_trip,
    check_dual_encoder_outputs,
    cosine,
    from_torch_state,
    torch_inputs,
    torch_state,
)
from test_altclip import randomise_
from test_clip_text import text_inputs

# Tiny configurations: widths, depths, head counts, both pooling conventions (end-of-text = last
# id and also the pad; the legacy eos_token_id=2, pooled at the largest id; an end token that is
# not the largest id), both activations, patch and image sizes (one not a multiple of the patch),
# projection widths and logit scales.
TINY = {
    "p8-32px-eos-last": dict(
        text=dict(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=98,
        ),
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8),
        projection_dim=20,
        logit_scale=2.6592,
    ),
    "p6-30px-legacy-eos2-gelu": dict(
        text=dict(
            vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=64,
            max_position_embeddings=20, bos_token_id=118, eos_token_id=2, pad_token_id=1, hidden_act="gelu",
        ),
        vision=dict(
            hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=50, image_size=30, patch_size=6,
            layer_norm_eps=1e-6,
        ),
        projection_dim=12,
        logit_scale=1.3,
    ),
    "p16-50px-eos50": dict(
        text=dict(
            vocab_size=77, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=31,
            max_position_embeddings=12, bos_token_id=49, eos_token_id=50, pad_token_id=0,
        ),
        vision=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=29, image_size=50, patch_size=16),
        projection_dim=8,
        logit_scale=3.5,
    ),
}


def hf_config(name):
    spec = TINY[name]
    # The text config's own projection_dim is the top-level one, as in released CLIP configs, so that
    # CLIPTextModelWithProjection can read the same directory.
    text = transformers.CLIPTextConfig(**spec["text"], projection_dim=spec["projection_dim"])
    vision = transformers.CLIPVisionConfig(**spec["vision"], projection_dim=spec["projection_dim"])
    return transformers.CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=spec["projection_dim"],
        logit_scale_init_value=spec["logit_scale"],
    )


def make_inputs(cfg, image_size, batch=3, length=9, seed=0):
    """Right-padded text rows (the first unpadded) with their mask, and NHWC pixels."""
    text = text_inputs(cfg.text_config, batch=batch, length=length, seed=seed)
    pixels = np.random.default_rng(seed).normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    return text, pixels


convert = functools.partial(from_torch_state, CLIPModel)


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "static"))
def _call(state, inputs, *, graphdef, method, static):
    return getattr(nnx.merge(graphdef, state), method)(**inputs, **dict(static))


def jitted(module, method="__call__", **static):
    """A jitted call of an NNX module's method (split/merge); ``static`` are fixed keyword flags.
    Modules of the same structure share one compilation."""
    graphdef, state = nnx.split(module)
    flags = tuple(sorted(static.items()))
    return lambda **inputs: _call(state, {k: jnp.asarray(v) for k, v in inputs.items()}, graphdef=graphdef,
                                  method=method, static=flags)


def check_outputs(out, ref, logit_scale, *, what, atol=1e-5):
    check_dual_encoder_outputs(out, ref, float(np.exp(logit_scale)), what=what, atol=atol, logits_atol=atol,
                               towers_relative=True)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    """A random tiny torch CLIPModel (eval), its state dict, config, inputs and outputs."""
    name = request.param
    hc = hf_config(name)
    tm = randomise_(transformers.CLIPModel(hc), seed=1).eval()
    cfg = CLIPConfig.from_hf(hc.to_dict())
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, seed=2)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    return dict(name=name, tm=tm, cfg=cfg, state=torch_state(tm), text=text, pixels=pixels, ref=ref,
                logit_scale=TINY[name]["logit_scale"])


def test_eval_outputs_and_features_match_torch(tiny):
    graphdef, state = nnx.split(convert(tiny["state"], tiny["cfg"]))

    @jax.jit
    def run(state, pixels, text):
        model = nnx.merge(graphdef, state)
        return (model(**text, pixel_values=pixels, return_loss=True), model.get_image_features(pixels),
                model.get_text_features(**text), model.get_text_features(text["input_ids"]))

    tm, (text, pixels) = tiny["tm"], (tiny["text"], tiny["pixels"])
    out, image_features, text_features, unmasked = run(state, pixels, text)
    check_outputs(out, tiny["ref"], tiny["logit_scale"], what=f"{tiny['name']} eval")
    d = tiny["cfg"].projection_dim
    assert image_features.shape == (3, d) and text_features.shape == (3, d), (image_features.shape, text_features.shape)
    with torch.no_grad():
        ref_text = tm.get_text_features(**{k: torch.tensor(v) for k, v in text.items()}).pooler_output
        ref_unmasked = tm.get_text_features(torch.tensor(text["input_ids"])).pooler_output
        ref_image = tm.get_image_features(torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output
    assert_close(text_features, ref_text, atol=1e-5, what=f"{tiny['name']} get_text_features (unnormalised)")
    assert_close(image_features, ref_image, atol=1e-5, what=f"{tiny['name']} get_image_features (unnormalised)")
    # Right padding behind a causal mask: without attention_mask the real tokens see the same keys.
    assert_close(unmasked, ref_unmasked, atol=1e-5, what=f"{tiny['name']} get_text_features without attention_mask")
    for features, ref, what in ((image_features, tiny["ref"].image_embeds, "image"), (text_features, tiny["ref"].text_embeds, "text")):
        unit = np.asarray(features) / np.linalg.norm(np.asarray(features), axis=-1, keepdims=True)
        assert_close(unit, ref, atol=1e-5, what=f"{tiny['name']} normalised get_{what}_features")


def test_interpolated_position_encoding_at_a_larger_nchw_image():
    name = "p16-50px-eos50"
    tm = randomise_(transformers.CLIPModel(hf_config(name)), seed=3).eval()
    cfg = CLIPConfig.from_hf(tm.config.to_dict())
    size = cfg.vision_config.image_size + 2 * cfg.vision_config.patch_size
    text, pixels = make_inputs(cfg, size, seed=4)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True, interpolate_pos_encoding=True)
    # As transformers' processors give it: NCHW, which the model transposes.
    nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    out = jitted(convert(torch_state(tm), cfg), return_loss=True, interpolate_pos_encoding=True)(**text, pixel_values=nchw)
    check_outputs(out, ref, TINY[name]["logit_scale"], what=f"{name} NCHW, interpolated at {size}px")


@pytest.mark.parametrize("name", ["p8-32px-eos-last", "p6-30px-legacy-eos2-gelu"])
def test_bf16_compute_is_close(name):
    tm = randomise_(transformers.CLIPModel(hf_config(name)), seed=12).eval()
    cfg = CLIPConfig.from_hf(tm.config.to_dict())
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, seed=13)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels))
    model = convert(torch_state(tm), cfg, dtype=jnp.bfloat16)
    out = jitted(model)(**text, pixel_values=pixels)
    for field in ("image_embeds", "text_embeds"):
        worst = float(np.min(cosine(getattr(out, field), getattr(ref, field))))
        assert worst >= 0.999, f"{name} bf16 {field}: lowest cosine to fp32 torch {worst:.6f} < 0.999"
    assert out.text_model_output.last_hidden_state.dtype == jnp.bfloat16, "compute dtype is not bfloat16"
    assert all(v.dtype == jnp.float32 for v in engine.model_params(model).values()), "bf16 model has non-fp32 parameters"


def test_round_trip_is_bit_exact_and_stale_buffers_are_ignored(tiny):
    state, cfg = tiny["state"], tiny["cfg"]
    model = convert(state, cfg)
    assert_round_trip(engine.nnx_to_torch(engine.model_params(model), clip_table(cfg), on_disk=False), state)
    stale = dict(state)
    stale["text_model.embeddings.position_ids"] = np.arange(cfg.text_config.max_position_embeddings)[None]
    stale["vision_model.embeddings.position_ids"] = np.arange(cfg.vision_config.num_positions)[None]
    expected = engine.model_params(model)
    for k, v in engine.model_params(convert(stale, cfg)).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=f"{k} differs with stale position_ids buffers")


def flat(state):
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name", ["p8-32px-eos-last", "p6-30px-legacy-eos2-gelu"])
def test_train_mode_loss_and_gradients(name):
    tm = randomise_(transformers.CLIPModel(hf_config(name)), seed=5).train()
    cfg = CLIPConfig.from_hf(tm.config.to_dict())
    model = convert(torch_state(tm), cfg)
    model.train()
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, batch=4, length=11, seed=6)
    ref = tm(**torch_inputs(text, pixels), return_loss=True)
    ref.loss.backward()
    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, inputs):
        out = nnx.merge(graphdef, params, rest)(**inputs, return_loss=True)
        return out.loss, out

    inputs = {k: jnp.asarray(v) for k, v in text.items()} | {"pixel_values": jnp.asarray(pixels)}
    (_, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, inputs)
    with torch.no_grad():
        check_outputs(out, ref, TINY[name]["logit_scale"], what=f"{name} train")

    torch_grads = engine.nnx_to_torch(flat(grads), clip_table(cfg), on_disk=False)
    assert set(torch_grads) == set(ref_grads), f"gradient key sets differ: {sorted(set(torch_grads) ^ set(ref_grads))}"
    model_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for key, g in ref_grads.items():
        if key.endswith("self_attn.k_proj.bias"):
            # Exactly zero in theory (a constant added to all key logits of a query cancels in the
            # softmax): both sides are rounding noise, measured against the largest gradient.
            for side, v in (("altjax", torch_grads[key]), ("torch", g)):
                noise = float(np.max(np.abs(v))) / model_scale
                assert noise <= 1e-4, f"{name} {side} gradient of {key} is {noise:.3e} of the largest, expected ~0"
            continue
        assert_rel_close(torch_grads[key], g, rtol=1e-4, what=f"{name} gradient of {key}")
    assert abs(float(ref_grads["logit_scale"])) > 0, "logit_scale gradient is zero: the check says nothing"


def test_save_pretrained_hf_loads_into_transformers(tiny, tmp_path):
    model = convert(tiny["state"], tiny["cfg"])
    model.save_pretrained(tmp_path / "ours", format="hf")
    tiny["tm"].save_pretrained(tmp_path / "reference")
    ours, written = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert set(ours) == set(written), f"export keys differ from save_pretrained's: {sorted(set(ours) ^ set(written))}"
    tm, info = transformers.CLIPModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"transformers reports {kind} loading our export: {info[kind]}"
    for k, v in tiny["state"].items():
        np.testing.assert_array_equal(tm.state_dict()[k].numpy(), v, err_msg=f"{k} differs after export + transformers load")
    with torch.no_grad():
        ref = tm.eval()(**torch_inputs(tiny["text"], tiny["pixels"]), return_loss=True)
    for field in ("image_embeds", "text_embeds", "logits_per_text", "loss"):
        np.testing.assert_array_equal(
            getattr(ref, field).numpy(), getattr(tiny["ref"], field).numpy(), err_msg=f"reloaded transformers {field} differs"
        )


def test_from_pretrained_transformers_and_altjax_directories(tiny, tmp_path):
    """Both directories load exactly the converted parameters (the eval test checks their outputs)."""
    tiny["tm"].save_pretrained(tmp_path / "hf")
    model = CLIPModel.from_pretrained(tmp_path / "hf")
    assert model.config.to_hf() == json.loads((tmp_path / "hf" / "config.json").read_text()), "config.json not read back as written"
    assert model.name_or_path == str(tmp_path / "hf"), model.name_or_path
    expected = engine.model_params(convert(tiny["state"], tiny["cfg"]))
    for k, v in engine.model_params(model).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=f"{k} differs after from_pretrained(HF dir)")

    model.save_pretrained(tmp_path / "altjax")
    again = CLIPModel.from_pretrained(tmp_path / "altjax")
    assert again.config == model.config, "config changed through an altjax directory"
    for k, v in engine.model_params(again).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=f"{k} differs after an altjax directory round trip")


def test_text_teacher_view_shares_parameters_and_matches(tmp_path):
    name = "p6-30px-legacy-eos2-gelu"
    tm = randomise_(transformers.CLIPModel(hf_config(name)), seed=7).eval()
    tm.save_pretrained(tmp_path)
    model = CLIPModel.from_pretrained(tmp_path)
    teacher = model.text_teacher()
    assert isinstance(teacher, CLIPTextTeacher)
    assert teacher.text_model is model.text_model and teacher.text_projection is model.text_projection, "teacher copied modules"
    assert teacher.config.projection_dim == model.config.projection_dim == 12, teacher.config

    loaded = CLIPTextTeacher.from_pretrained(tmp_path)
    assert loaded.config == teacher.config, f"teacher configs differ: {loaded.config} != {teacher.config}"
    view, expected = engine.model_params(teacher), engine.model_params(loaded)
    assert set(view) == set(expected), f"teacher parameter sets differ: {sorted(set(view) ^ set(expected))}"
    for k, v in expected.items():
        np.testing.assert_array_equal(view[k], v, err_msg=f"teacher view {k} differs from CLIPTextTeacher.from_pretrained's")

    text = text_inputs(model.config.text_config, seed=8)
    features = jitted(teacher, "get_text_features")(**text)
    reference = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = reference(**{k: torch.tensor(v) for k, v in text.items()}).text_embeds
    assert_close(features, ref, atol=1e-5, what="teacher view vs CLIPTextModelWithProjection text_embeds")

    # Shared, not copied: an update to the model's projection is the teacher's too.
    model.text_projection.kernel[...] = 2 * model.text_projection.kernel[...]
    np.testing.assert_array_equal(np.asarray(jitted(teacher, "get_text_features")(**text)), 2 * np.asarray(features),
                                  err_msg="teacher view did not see the model's update")


def test_bad_checkpoints_are_reported(tmp_path):
    name = "p8-32px-eos-last"
    tm = transformers.CLIPModel(hf_config(name))
    tm.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_model.encoder.layers.0.self_attn.v_proj.bias"]
    weights["visual_projection.weight"] = weights["visual_projection.weight"][:, :-1].copy()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(engine.ConversionError, match=r"missing keys \(1\): text_model\.encoder\.layers\.0\.self_attn\.v_proj\.bias"):
        CLIPModel.from_pretrained(tmp_path)
    weights["text_model.encoder.layers.0.self_attn.v_proj.bias"] = np.zeros(32, np.float32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(engine.ConversionError, match=r"visual_projection\.weight: .* has \(20, 31\), the model expects \(20, 32\)"):
        CLIPModel.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="altclip")))
    with pytest.raises(CheckpointError, match=r"model_type is 'altclip', expected 'clip'"):
        CLIPModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a CLIP config: model_type is 'altclip', expected 'clip'"):
        CLIPConfig.from_hf(dict(config, model_type="altclip"))


def test_config_round_trip_legacy_dicts_and_presets():
    for hc in [transformers.CLIPConfig(), hf_config("p8-32px-eos-last"), hf_config("p6-30px-legacy-eos2-gelu")]:
        d = hc.to_dict()
        assert CLIPConfig.from_hf(d).to_hf() == d, "CLIPConfig dict changed in the round trip"
        on_disk = json.loads(json.dumps(d))  # as config.json holds it (id2label keys become strings)
        assert CLIPConfig.from_hf(on_disk).to_hf() == on_disk, "JSON-loaded dict changed in the round trip"
    ours, ref = CLIPConfig(), transformers.CLIPConfig()
    for f in ("projection_dim", "logit_scale_init_value", "initializer_factor"):
        assert getattr(ours, f) == getattr(ref, f), f"default {f}: {getattr(ours, f)!r} != transformers {getattr(ref, f)!r}"

    # Legacy text_config_dict / vision_config_dict override text_config / vision_config as in transformers.
    legacy = dict(
        model_type="clip",
        text_config=dict(hidden_size=64, num_attention_heads=4, vocab_size=50),
        text_config_dict=dict(TINY["p8-32px-eos-last"]["text"]),
        vision_config_dict=dict(TINY["p6-30px-legacy-eos2-gelu"]["vision"]),
    )
    ours = CLIPConfig.from_hf(legacy).to_hf()
    ref = transformers.CLIPConfig(**{k: v for k, v in legacy.items() if k != "model_type"}).to_dict()
    assert "text_config_dict" not in ours and "vision_config_dict" not in ours, "legacy keys kept"
    for part in ("text_config", "vision_config"):
        for k, v in ours[part].items():
            assert ref[part].get(k) == v, f"legacy {part}.{k}: {v!r} != transformers {ref[part].get(k)!r}"

    assert CLIPConfig.from_preset("clip-vit-b32").to_hf() == CLIPConfig().to_hf()
    for name in ("clip-vit-l14", "clip-tiny"):
        d = CLIPConfig.from_preset(name).to_hf()
        built = transformers.CLIPConfig(**d).to_dict()
        for part in ("text_config", "vision_config"):
            for k, v in d[part].items():
                assert built[part].get(k) == v, f"{name} preset {part}.{k}: {v!r} != transformers {built[part].get(k)!r}"
    l14 = CLIPConfig.from_preset("clip-vit-l14")
    v, t = l14.vision_config, l14.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (1024, 24, 16, 14, 224), v
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, l14.projection_dim) == (768, 12, 12, 768), t
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        CLIPConfig.from_preset("clip-vit-h14")


@pytest.fixture(scope="module")
def abstract_b32():
    """The "clip-vit-b32" config and its abstract model (tracing the full-size init takes seconds)."""
    cfg = CLIPConfig.from_preset("clip-vit-b32")
    return cfg, nnx.eval_shape(lambda: CLIPModel(cfg))


@pytest.mark.parametrize("preset", ["clip-vit-b32", "clip-vit-l14"])
def test_full_size_parameter_counts_and_keys(preset, abstract_b32):
    cfg = CLIPConfig.from_preset(preset)
    model = abstract_b32[1] if preset == "clip-vit-b32" else nnx.eval_shape(lambda: CLIPModel(cfg))
    shapes = engine.model_shapes(model)
    with torch.device("meta"):
        tm = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_hf()))
    table = clip_table(cfg)
    assert {r.torch for r in table.rows} == set(tm.state_dict()), f"{preset}: table and transformers keys differ"
    torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    for r in table.rows:
        want = torch_shapes[r.torch][::-1] if r.layout == "linear" else torch_shapes[r.torch]
        if r.layout == "conv":
            o, i, kh, kw = torch_shapes[r.torch]
            want = (kh, kw, i, o)
        assert tuple(shapes[r.nnx]) == want, f"{preset} {r.nnx}: shape {shapes[r.nnx]}, transformers' {r.torch} gives {want}"
    for prefix in ("", "text_model.", "vision_model.", "visual_projection.", "text_projection."):
        ours = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))
        theirs = sum(p.numel() for k, p in tm.named_parameters() if k.startswith(prefix))
        assert ours == theirs, f"{preset} {prefix or 'total'}: {ours:,} parameters, transformers has {theirs:,}"


def test_tiny_preset_matches_transformers_at_64px():
    """"clip-tiny" with transformers' own initialisation (a fresh model), full-length captions."""
    cfg = CLIPConfig.from_preset("clip-tiny")
    torch.manual_seed(9)
    tm = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_hf())).eval()
    text, pixels = make_inputs(cfg, 64, batch=4, length=cfg.text_config.max_position_embeddings, seed=9)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    out = jitted(convert(torch_state(tm), cfg), return_loss=True)(**text, pixel_values=pixels)
    check_outputs(out, ref, cfg.logit_scale_init_value, what="clip-tiny")
    # Fresh weights: small cosines, so the loss is near log(batch).
    assert abs(float(out.loss) - np.log(4)) < 0.5, f"fresh clip-tiny loss {float(out.loss):.3f} far from log 4"


def test_full_size_vit_b32_fp32_matches(abstract_b32):
    """The "clip-vit-b32" preset (151M parameters) at batch 2, 77 tokens padded with end-of-text."""
    cfg, model = abstract_b32
    with no_init_weights():  # randomise_ overwrites every parameter; skipping the init saves seconds
        tm = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_hf()))
    randomise_(tm, seed=10).eval()
    ids = np.full((2, 77), 49407)
    rng = np.random.default_rng(11)
    ids[0, :13] = [49406, *rng.integers(0, 49406, 11), 49407]
    ids[1, :40] = [49406, *rng.integers(0, 49406, 38), 49407]
    text = dict(input_ids=ids, attention_mask=(np.arange(77)[None] < np.array([[13], [40]])).astype(np.int64))
    pixels = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    # Views of the torch tensors (no copy); once loaded, the model holds the only copy.
    views = {k: v.numpy() for k, v in tm.state_dict().items()}
    engine.load_params(model, engine.torch_to_nnx(views, clip_table(cfg), engine.model_shapes(model)))
    nnx.reseed(model, default=0, dropout=0)
    del tm, views
    out = jitted(model, return_loss=True)(**text, pixel_values=pixels)
    check_outputs(out, ref, cfg.logit_scale_init_value, what="clip-vit-b32 fp32")
    assert float(ref.loss) > 0.01, f"loss {float(ref.loss):.3e}: too small for the check to say anything"
