"""AltCLIPModel against transformers' AltCLIPModel with random weights.

Tolerances (float32 unless said): L2-normalised embeddings and tower outputs 1e-5 absolute (1e-4
at full size, where 24 ViT-L and 24 XLM-R layers accumulate rounding); logits 1e-4 * exp(logit_scale)
absolute (cosines scaled by exp(logit_scale), so the cosine error times that scale); loss likewise,
since |d loss| <= max |d logit|; gradients 1e-4 relative to the largest reference gradient of each
tensor; conversions bit-exact; bfloat16 compute: cosine to the float32 reference >= 0.999.
"""
import dataclasses
import functools
import gc
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from altjax.model_io import engine
from altjax.model_io.directories import CheckpointError
from altjax.models.altclip import AltCLIPConfig, AltCLIPModel, altclip_table
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

# Tiny configurations: widths, depths, head counts, patch and image sizes (one not a multiple of
# the patch), pad ids, projection widths, logit scales.
TINY = {
    "p8-32px": dict(
        text=dict(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40, project_dim=24,
        ),
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8),
        projection_dim=20,
        logit_scale=2.6592,
    ),
    "p6-30px-pad3": dict(
        text=dict(
            vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=64,
            max_position_embeddings=24, project_dim=16, pad_token_id=3,
        ),
        vision=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=50, image_size=30, patch_size=6),
        projection_dim=12,
        logit_scale=1.3,
    ),
    "p16-50px": dict(
        text=dict(
            vocab_size=77, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=31,
            max_position_embeddings=30, project_dim=40,
        ),
        vision=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=29, image_size=50, patch_size=16),
        projection_dim=8,
        logit_scale=3.5,
    ),
}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(name, *, train=False):
    spec = TINY[name]
    text = transformers.AltCLIPTextConfig(**spec["text"], **(NO_DROPOUT if train else {}))
    vision = transformers.AltCLIPVisionConfig(**spec["vision"])
    return transformers.AltCLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=spec["projection_dim"],
        logit_scale_init_value=spec["logit_scale"],
    )


def randomise_(model, seed):
    """Random weights of O(1) activations: LayerNorm affine, padding rows and embeddings included."""
    gen = torch.Generator().manual_seed(seed)

    def noise(p):
        return torch.randn(p.shape, generator=gen)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.2 * noise(module.weight))
                module.bias.copy_(0.1 * noise(module.bias))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(0.5 * noise(module.weight))
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.copy_(noise(module.weight) / float(np.prod(module.weight.shape[1:])) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * noise(module.bias))
        if hasattr(model, "vision_model"):
            embeddings = model.vision_model.embeddings
            embeddings.class_embedding.copy_(noise(embeddings.class_embedding))
    return model


def make_inputs(cfg, image_size, batch=3, length=9, seed=0):
    """``<s> ... </s>`` rows right-padded with the pad id (the first unpadded) and their mask; NHWC pixels."""
    tc = cfg.text_config
    rng = np.random.default_rng(seed)
    words = np.array([t for t in range(tc.vocab_size) if t not in {tc.pad_token_id, tc.bos_token_id, tc.eos_token_id}])
    ids = rng.choice(words, (batch, length))
    lengths = np.linspace(length, 3, batch).astype(int)
    ids[:, 0] = tc.bos_token_id
    ids[np.arange(batch), lengths - 1] = tc.eos_token_id
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    text = dict(input_ids=np.where(mask == 1, ids, tc.pad_token_id), attention_mask=mask)
    pixels = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    return text, pixels


convert = functools.partial(from_torch_state, AltCLIPModel)


def jitted_forward(model):
    """Jitted ``model(..., return_loss=True)``; flags other than inputs are static."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs, return_loss=True)

    @jax.jit
    def forward_interpolated(state, inputs):
        return nnx.merge(graphdef, state)(**inputs, return_loss=True, interpolate_pos_encoding=True)

    def call(interpolate_pos_encoding=False, **inputs):
        inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
        return (forward_interpolated if interpolate_pos_encoding else forward)(state, inputs)

    return call


def check_outputs(out, ref, logit_scale, *, what, atol=1e-5):
    check_dual_encoder_outputs(out, ref, float(np.exp(logit_scale)), what=what, atol=atol, logits_atol=1e-4)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    """A random tiny torch AltCLIPModel (eval), its state dict, config, inputs and outputs."""
    name = request.param
    hc = hf_config(name)
    tm = randomise_(transformers.AltCLIPModel(hc), seed=1).eval()
    cfg = AltCLIPConfig.from_hf(hc.to_dict())
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, seed=2)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    return dict(name=name, hc=hc, tm=tm, cfg=cfg, state=torch_state(tm), text=text, pixels=pixels, ref=ref)


def test_eval_matches_torch(tiny):
    out = jitted_forward(convert(tiny["state"], tiny["cfg"]))(**tiny["text"], pixel_values=tiny["pixels"])
    check_outputs(out, tiny["ref"], TINY[tiny["name"]]["logit_scale"], what=f"{tiny['name']} eval")


def test_nchw_pixels_and_text_without_mask(tiny):
    forward = jitted_forward(convert(tiny["state"], tiny["cfg"]))
    nchw = np.ascontiguousarray(tiny["pixels"].transpose(0, 3, 1, 2))
    out = forward(**tiny["text"], pixel_values=nchw)
    check_outputs(out, tiny["ref"], TINY[tiny["name"]]["logit_scale"], what=f"{tiny['name']} NCHW input")
    # Without a mask the reference attends the pads: padded rows change, and must change alike.
    ids = tiny["text"]["input_ids"]
    with torch.no_grad():
        ref = tiny["tm"](input_ids=torch.tensor(ids), pixel_values=torch.tensor(nchw), return_loss=True)
    moved = np.abs(ref.text_embeds.numpy() - tiny["ref"].text_embeds.numpy()).max(-1)
    assert moved[0] <= 1e-6 and np.all(moved[1:] > 1e-4), f"only padded rows should change without a mask: {moved}"
    out = forward(input_ids=ids, pixel_values=tiny["pixels"])
    check_outputs(out, ref, TINY[tiny["name"]]["logit_scale"], what=f"{tiny['name']} no attention mask")


def test_interpolated_position_encoding_at_a_larger_image(tiny):
    size = tiny["cfg"].vision_config.image_size + 2 * tiny["cfg"].vision_config.patch_size
    text, pixels = make_inputs(tiny["cfg"], size, seed=3)
    with torch.no_grad():
        ref = tiny["tm"](**torch_inputs(text, pixels), return_loss=True, interpolate_pos_encoding=True)
    out = jitted_forward(convert(tiny["state"], tiny["cfg"]))(**text, pixel_values=pixels, interpolate_pos_encoding=True)
    check_outputs(out, ref, TINY[tiny["name"]]["logit_scale"], what=f"{tiny['name']} interpolated at {size}px")


def test_features_match_and_normalise_to_the_embeddings(tiny):
    model = convert(tiny["state"], tiny["cfg"])
    graphdef, state = nnx.split(model)
    image_features = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))(state, tiny["pixels"])
    text_features = jax.jit(lambda s, t: nnx.merge(graphdef, s).get_text_features(**t))(state, tiny["text"])
    d = tiny["cfg"].projection_dim
    assert image_features.shape == (3, d) and text_features.shape == (3, d), (image_features.shape, text_features.shape)
    tm, (text, pixels) = tiny["tm"], (tiny["text"], tiny["pixels"])
    with torch.no_grad():
        ref_text = tm.get_text_features(**{k: torch.tensor(v) for k, v in text.items()}).pooler_output
        ref_image = tm.get_image_features(torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output
    assert_close(text_features, ref_text, atol=1e-5, what="get_text_features (unnormalised)")
    assert_close(image_features, ref_image, atol=1e-5, what="get_image_features (unnormalised)")
    for features, ref, what in ((image_features, tiny["ref"].image_embeds, "image"), (text_features, tiny["ref"].text_embeds, "text")):
        unit = np.asarray(features) / np.linalg.norm(np.asarray(features), axis=-1, keepdims=True)
        assert_close(unit, ref, atol=1e-5, what=f"normalised get_{what}_features")


def test_bf16_compute_is_close(tiny):
    model = convert(tiny["state"], tiny["cfg"], dtype=jnp.bfloat16)
    out = jitted_forward(model)(**tiny["text"], pixel_values=tiny["pixels"])
    for field in ("image_embeds", "text_embeds"):
        worst = float(np.min(cosine(getattr(out, field), getattr(tiny["ref"], field))))
        assert worst >= 0.999, f"{tiny['name']} bf16 {field}: lowest cosine to fp32 torch {worst:.6f} < 0.999"
    assert all(v.get_value().dtype == jnp.float32 for v in engine.model_variables(model).values()), "bf16 model has non-fp32 parameters"


def test_round_trip_is_bit_exact(tiny):
    state = tiny["state"]
    back = engine.nnx_to_torch(engine.model_params(convert(state, tiny["cfg"])), altclip_table(tiny["cfg"]), on_disk=False)
    assert_round_trip(back, state)


def flat(state):
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", ["p8-32px", "p6-30px-pad3"])
def test_train_mode_loss_and_gradients(name, scan):
    """Train mode against transformers, both towers' layers unrolled or stacked and scanned."""
    hc = hf_config(name, train=True)
    tm = randomise_(transformers.AltCLIPModel(hc), seed=4).train()
    cfg = AltCLIPConfig.from_hf(hc.to_dict())
    tag = f"{name} {'scanned' if scan else 'unrolled'}"
    cfg = dataclasses.replace(cfg, text_config=dataclasses.replace(cfg.text_config, scan_layers=scan),
                              vision_config=dataclasses.replace(cfg.vision_config, scan_layers=scan))
    model = convert(torch_state(tm), cfg)
    model.train()
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, batch=4, length=11, seed=5)
    ref = tm(**torch_inputs(text, pixels), return_loss=True)
    ref.loss.backward()
    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_fn(params, rest, inputs):
        out = nnx.merge(graphdef, params, rest)(**inputs, return_loss=True)
        return out.loss, out

    inputs = {k: jnp.asarray(v) for k, v in text.items()} | {"pixel_values": jnp.asarray(pixels)}
    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, inputs)
    with torch.no_grad():
        check_outputs(out, ref, TINY[name]["logit_scale"], what=f"{tag} train")

    torch_grads = engine.nnx_to_torch(flat(grads), altclip_table(cfg), on_disk=False)
    assert set(torch_grads) == set(ref_grads), f"gradient key sets differ: {sorted(set(torch_grads) ^ set(ref_grads))}"
    model_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for key, g in ref_grads.items():
        if key.endswith(("attention.self.key.bias", "self_attn.k_proj.bias")):
            # Exactly zero in theory (a constant added to all key logits of a query cancels in the
            # softmax): both sides are rounding noise, measured against the largest gradient.
            for side, v in (("altjax", torch_grads[key]), ("torch", g)):
                noise = float(np.max(np.abs(v))) / model_scale
                assert noise <= 1e-4, f"{tag} {side} gradient of {key} is {noise:.3e} of the largest, expected ~0"
            continue
        assert_rel_close(torch_grads[key], g, rtol=1e-4, what=f"{tag} gradient of {key}")
    assert abs(float(ref_grads["logit_scale"])) > 0, "logit_scale gradient is zero: the check says nothing"


def test_transformers_directory_loads_with_both_spellings(tiny, tmp_path):
    tiny["tm"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    # transformers 5 writes "layer." in both towers (reverting its load-time rename for every key).
    for prefix in ("text_model.roberta.encoder.layer.0.", "vision_model.encoder.layer.0."):
        assert any(k.startswith(prefix) for k in weights), f"save_pretrained wrote no {prefix}* keys"
    assert not any("layers." in k for k in weights), "save_pretrained wrote a layers. key"
    model = AltCLIPModel.from_pretrained(tmp_path)
    assert model.config.to_hf() == json.loads((tmp_path / "config.json").read_text()), "config.json not read back as written"
    out = jitted_forward(model)(**tiny["text"], pixel_values=tiny["pixels"])
    direct = jitted_forward(convert(tiny["state"], tiny["cfg"]))(**tiny["text"], pixel_values=tiny["pixels"])
    for field in ("image_embeds", "text_embeds", "logits_per_text", "loss"):
        np.testing.assert_array_equal(
            np.asarray(getattr(out, field)), np.asarray(getattr(direct, field)), err_msg=f"from_pretrained {field} differs"
        )
    check_outputs(out, tiny["ref"], TINY[tiny["name"]]["logit_scale"], what="from_pretrained")

    # The Hub layout (text "layer.", vision "layers.") and stale id buffers load to the same weights.
    hub = {k.replace("vision_model.encoder.layer.", "vision_model.encoder.layers."): v for k, v in weights.items()}
    positions = tiny["cfg"].text_config.max_position_embeddings
    hub["text_model.roberta.embeddings.position_ids"] = np.arange(positions)[None]
    hub["text_model.roberta.embeddings.token_type_ids"] = np.zeros((1, positions), np.int64)
    hub["vision_model.embeddings.position_ids"] = np.arange(5)[None]
    save_file(hub, tmp_path / "model.safetensors", metadata={"format": "pt"})
    params, expected = engine.model_params(AltCLIPModel.from_pretrained(tmp_path)), engine.model_params(model)
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v, err_msg=f"{k} differs when loaded from the Hub layout")


def test_export_loads_into_transformers(tiny, tmp_path):
    model = convert(tiny["state"], tiny["cfg"])
    weights = engine.nnx_to_torch(engine.model_params(model), altclip_table(tiny["cfg"]), on_disk=True)
    tiny["tm"].save_pretrained(tmp_path / "reference")
    written = load_file(tmp_path / "reference" / "model.safetensors")
    assert set(weights) == set(written), f"export keys differ from save_pretrained's: {sorted(set(weights) ^ set(written))}"
    (tmp_path / "ours").mkdir()
    save_file(weights, tmp_path / "ours" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ours" / "config.json").write_text(json.dumps(tiny["cfg"].to_hf()))
    tm, info = transformers.AltCLIPModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
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


def test_bad_checkpoints_are_reported(tiny, tmp_path):
    tiny["tm"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_model.roberta.encoder.layer.0.attention.self.value.bias"]
    weights["visual_projection.weight"] = weights["visual_projection.weight"][:, :-1].copy()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(engine.ConversionError, match=r"missing keys \(1\): text_model\.roberta\.encoder\.layers\.0\.attention\.self\.value\.bias"):
        AltCLIPModel.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="align")))
    with pytest.raises(CheckpointError, match=r"model_type is 'align', expected 'altclip'"):
        AltCLIPModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not an AltCLIP config: model_type is 'align', expected 'altclip'"):
        AltCLIPConfig.from_hf(dict(config, model_type="align"))


def test_misshapen_projection_is_named(tiny):
    state = dict(tiny["state"])
    d, w = tiny["cfg"].projection_dim, tiny["cfg"].vision_config.hidden_size
    state["visual_projection.weight"] = state["visual_projection.weight"][:, :-1].copy()
    with pytest.raises(engine.ConversionError, match=rf"visual_projection\.weight: .* has \({d}, {w - 1}\), the model expects \({d}, {w}\)"):
        convert(state, tiny["cfg"])


def test_config_round_trip_legacy_dicts_and_presets():
    for hc in [transformers.AltCLIPConfig(), hf_config("p8-32px"), hf_config("p6-30px-pad3", train=True)]:
        d = hc.to_dict()
        assert AltCLIPConfig.from_hf(d).to_hf() == d, "AltCLIPConfig dict changed in the round trip"
        on_disk = json.loads(json.dumps(d))  # as config.json holds it (id2label keys become strings)
        assert AltCLIPConfig.from_hf(on_disk).to_hf() == on_disk, "JSON-loaded dict changed in the round trip"

    # Legacy text_config_dict / vision_config_dict override text_config / vision_config as in transformers.
    legacy = dict(
        model_type="altclip",
        text_config=dict(hidden_size=64, num_attention_heads=4, vocab_size=50),
        text_config_dict=dict(TINY["p8-32px"]["text"]),
        vision_config_dict=dict(TINY["p6-30px-pad3"]["vision"]),
    )
    ours = AltCLIPConfig.from_hf(legacy).to_hf()
    ref = transformers.AltCLIPConfig(**{k: v for k, v in legacy.items() if k != "model_type"}).to_dict()
    assert "text_config_dict" not in ours and "vision_config_dict" not in ours, "legacy keys kept"
    for part in ("text_config", "vision_config"):
        for k, v in ours[part].items():
            assert ref[part].get(k) == v, f"legacy {part}.{k}: {v!r} != transformers {ref[part].get(k)!r}"

    l14 = AltCLIPConfig.from_preset("altclip").to_hf()
    built = transformers.AltCLIPConfig(**l14).to_dict()
    for part in ("text_config", "vision_config"):
        for k, v in l14[part].items():
            assert built[part].get(k) == v, f"altclip preset {part}.{k}: {v!r} != transformers {built[part].get(k)!r}"
    assert (l14["vision_config"]["patch_size"], l14["vision_config"]["hidden_size"], l14["projection_dim"]) == (14, 1024, 768)
    assert AltCLIPConfig.from_preset("altclip-b32").to_hf() == AltCLIPConfig().to_hf()
    for k, v in AltCLIPConfig().to_hf()["vision_config"].items():
        assert transformers.AltCLIPConfig().to_dict()["vision_config"].get(k) == v, f"default vision_config.{k} differs"
    with pytest.raises(ValueError, match="unknown AltCLIP preset"):
        AltCLIPConfig.from_preset("altclip-huge")


@pytest.fixture(scope="module")
def altclip_l14():
    """The "altclip" preset and its abstract model (tracing the full-size init takes ~10 s)."""
    cfg = AltCLIPConfig.from_preset("altclip")
    return cfg, nnx.eval_shape(lambda: AltCLIPModel(cfg))


def test_full_size_parameter_counts(altclip_l14):
    shapes = engine.model_shapes(altclip_l14[1])
    # transformers' counts for this configuration (reference section 2.6).
    expected = {"": 864_186_113, "vision_model.": 303_179_776, "text_model.": 559_630_080, "visual_projection.": 786_432}
    for prefix, count in expected.items():
        total = sum(int(np.prod(v)) for k, v in shapes.items() if k.startswith(prefix))
        assert total == count, f"altclip {prefix or 'total'}: {total:,} parameters, transformers has {count:,}"


def test_tiny_preset_matches_transformers_keys_and_runs():
    cfg = AltCLIPConfig.from_preset("altclip-tiny")
    tm = transformers.AltCLIPModel(transformers.AltCLIPConfig(**cfg.to_hf()))
    assert set(torch_state(tm)) == {r.torch for r in altclip_table(cfg).rows}, "altclip-tiny table and transformers keys differ"
    text, pixels = make_inputs(cfg, cfg.vision_config.image_size, batch=2, length=8, seed=6)
    out = jitted_forward(AltCLIPModel(cfg))(**text, pixel_values=pixels)
    assert out.logits_per_text.shape == (2, 2) and np.isfinite(float(out.loss))


def test_full_size_fp32_matches(altclip_l14):
    """The "altclip" preset (ViT-L/14 + XLM-R large, 864M parameters) at batch 2, text length 16."""
    cfg, model = altclip_l14
    torch.manual_seed(0)
    tm = randomise_(transformers.AltCLIPModel(transformers.AltCLIPConfig(**cfg.to_hf())), seed=7).eval()
    text, pixels = make_inputs(cfg, 224, batch=2, length=16, seed=8)
    with torch.no_grad():
        ref = tm(**torch_inputs(text, pixels), return_loss=True)
    logit_scale = tm.logit_scale.item()
    # Views of the torch tensors (no copy); once loaded, the model holds the only copy.
    views = {k: v.numpy() for k, v in tm.state_dict().items()}
    engine.load_params(model, engine.torch_to_nnx(views, altclip_table(cfg), engine.model_shapes(model)))
    del tm, views
    gc.collect()
    out = jitted_forward(model)(**text, pixel_values=pixels)
    check_outputs(out, ref, logit_scale, what="altclip (ViT-L/14) fp32", atol=1e-4)
