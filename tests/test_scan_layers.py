"""``scan_layers``: the transformer towers' layers stacked and run by one scan, in either checkpoint
layout. CLIP in depth here (outputs, every hidden state, gradients, dropout draws); HF ALIGN and
AltCLIP directories through scanned models here, and their scanned train-mode outputs and
gradients against transformers in ``test_align`` / ``test_altclip`` (their tolerances).

Tolerances (float32): scanned against unrolled altjax (the same arithmetic, compiled as a loop
body instead of inline, so rounding may differ), embeddings and loss 1e-6 absolute, hidden states
1e-6 relative to their largest value (the residual stream reaches ~5, a few float32 ulps), and loss
gradients 1e-5 relative to each tensor's largest unrolled gradient; against transformers, those of
``test_clip`` (embeddings 1e-5 absolute, logits and loss 1e-5 * exp(logit_scale), tower outputs and
hidden states 1e-5 relative, gradients 1e-4 relative); every conversion and round trip bit-exact.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from altjax.model_io import engine
from altjax.models.align import AlignModel
from altjax.models.altclip import AltCLIPModel
from altjax.models.clip import CLIPModel
from helpers import assert_close, assert_rel_close, assert_round_trip, check_dual_encoder_outputs, tiny_hf_dir, torch_inputs
import test_align
import test_altclip
from test_altclip import randomise_
from test_clip import make_inputs

LAYERS = 4
LOGIT_SCALE = 2.6592


def hf_config():
    text = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=98, projection_dim=20,
    )
    vision = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                           intermediate_size=37, image_size=32, patch_size=8, projection_dim=20)
    return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=20,
                                   logit_scale_init_value=LOGIT_SCALE)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random 4 + 4 layer torch CLIPModel saved as an HF directory, with inputs and train-mode
    outputs and gradients (attention dropout is 0, so train mode is deterministic)."""
    path = tmp_path_factory.mktemp("scan") / "hf"
    tm = randomise_(transformers.CLIPModel(hf_config()), seed=1)
    tm.save_pretrained(path)
    unrolled = CLIPModel.from_pretrained(path)
    text, pixels = make_inputs(unrolled.config, unrolled.config.vision_config.image_size, batch=4, length=11, seed=2)
    ref = tm.train()(**torch_inputs(text, pixels), return_loss=True, output_hidden_states=True)
    ref.loss.backward()
    grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    return dict(path=path, text=text, pixels=pixels, ref=ref, grads=grads)


def flat(state):
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def run(model, text, pixels):
    """Train-mode outputs (hidden states included) and loss gradients in transformers' keys."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, inputs):
        out = nnx.merge(graphdef, params, rest, copy=True)(**inputs, return_loss=True, output_hidden_states=True)
        return out.loss, out

    inputs = {k: jnp.asarray(v) for k, v in text.items()} | {"pixel_values": jnp.asarray(pixels)}
    (_, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, inputs)
    return out, engine.nnx_to_torch(flat(grads), model.conversion_table(model.config), on_disk=False)


def scanned_towers(model) -> tuple[bool, bool]:
    return model.config.vision_config.scan_layers, model.config.text_config.scan_layers


def torch_params(model) -> dict[str, np.ndarray]:
    return engine.nnx_to_torch(engine.model_params(model), model.conversion_table(model.config), on_disk=False)


@pytest.fixture(scope="module")
def both(hf):
    unrolled = CLIPModel.from_pretrained(hf["path"])
    scanned = CLIPModel.from_pretrained(hf["path"], scan_layers=True)
    assert scanned_towers(unrolled) == (False, False) and scanned_towers(scanned) == (True, True)
    kernel = engine.model_shapes(scanned)["vision_model.encoder.layers.mlp.fc1.kernel"]
    assert kernel == (LAYERS, 32, 37), f"scanned fc1 kernel has shape {kernel}, expected {(LAYERS, 32, 37)}"
    return dict(unrolled=(unrolled, *run(unrolled, hf["text"], hf["pixels"])),
                scanned=(scanned, *run(scanned, hf["text"], hf["pixels"])))


def hidden_states(out):
    return {f"{tower} hidden_states[{i}]": h for tower in ("vision_model_output", "text_model_output")
            for i, h in enumerate(getattr(out, tower).hidden_states)}


def test_scanned_equals_unrolled(both):
    _, out, grads = both["unrolled"]
    _, scanned_out, scanned_grads = both["scanned"]
    for field in ("image_embeds", "text_embeds", "loss"):
        assert_close(getattr(scanned_out, field), getattr(out, field), atol=1e-6, what=f"scanned vs unrolled {field}")
    states, scanned_states = hidden_states(out), hidden_states(scanned_out)
    assert set(scanned_states) == set(states) and len(states) == 2 * (LAYERS + 1), sorted(scanned_states)
    for name, h in states.items():
        assert_rel_close(scanned_states[name], h, rtol=1e-6, what=f"scanned vs unrolled {name}")
    assert set(scanned_grads) == set(grads), f"gradient keys differ: {sorted(set(scanned_grads) ^ set(grads))}"
    for key, g in grads.items():
        if key.endswith("self_attn.k_proj.bias"):
            continue  # zero in theory (softmax shift invariance): both are rounding noise
        assert_rel_close(scanned_grads[key], g, rtol=1e-5, what=f"scanned vs unrolled gradient of {key}")


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_both_layouts_match_transformers(both, hf, layout):
    _, out, grads = both[layout]
    ref = hf["ref"]
    with torch.no_grad():
        check_dual_encoder_outputs(out, ref, float(np.exp(LOGIT_SCALE)), what=layout, atol=1e-5, logits_atol=1e-5,
                                   towers_relative=True)
        for tower in ("vision_model_output", "text_model_output"):
            ours, theirs = getattr(out, tower).hidden_states, getattr(ref, tower).hidden_states
            assert len(ours) == len(theirs), f"{layout} {tower}: {len(ours)} hidden states, transformers {len(theirs)}"
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_rel_close(a, b, rtol=1e-5, what=f"{layout} {tower}.hidden_states[{i}]")
    scale = max(float(np.max(np.abs(g))) for g in hf["grads"].values())
    assert set(grads) == set(hf["grads"]), f"gradient keys differ: {sorted(set(grads) ^ set(hf['grads']))}"
    for key, g in hf["grads"].items():
        if key.endswith("self_attn.k_proj.bias"):
            noise = float(np.max(np.abs(grads[key]))) / scale
            assert noise <= 1e-4, f"{layout} gradient of {key} is {noise:.3e} of the largest, expected ~0"
            continue
        assert_rel_close(grads[key], g, rtol=1e-4, what=f"{layout} gradient of {key}")


def test_hf_directory_through_a_scanned_model_is_bit_exact(both, hf, tmp_path):
    scanned = both["scanned"][0]
    scanned.save_pretrained(tmp_path / "out", format="hf")
    original, written = load_file(hf["path"] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert_round_trip(written, original)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((hf["path"] / "config.json").read_text()), "HF config.json changed through a scanned model"


@pytest.mark.parametrize("source, target", [("scanned", False), ("unrolled", True)])
def test_altjax_directories_load_in_either_layout(both, tmp_path, source, target):
    model = both[source][0]
    model.save_pretrained(tmp_path / "altjax")
    recorded = json.loads((tmp_path / "altjax" / "config.json").read_text())
    layout = (recorded["vision_config"].get("scan_layers"), recorded["text_config"].get("scan_layers"))
    assert layout == ((True, True) if source == "scanned" else (None, None)), f"{source} directory records {layout}"
    expected = torch_params(model)
    same = CLIPModel.from_pretrained(tmp_path / "altjax")
    assert same.config == model.config, f"{source} layout not read back: {scanned_towers(same)}"
    other = CLIPModel.from_pretrained(tmp_path / "altjax", scan_layers=target)
    assert scanned_towers(other) == (target, target), f"scan_layers={target} gave {scanned_towers(other)}"
    for loaded in (same, other):
        assert_round_trip(torch_params(loaded), expected)


def dropout_keys(model):
    return np.asarray(jax.random.key_data(model.vision_model.encoder.layers.self_attn.dropout.rngs.key[...]))


def test_dropout_draws_other_masks_in_every_layer(hf):
    loaded = CLIPModel.from_pretrained(hf["path"], scan_layers=True, seed=3)
    for model in (loaded, CLIPModel(loaded.config, rngs=nnx.Rngs(3))):
        keys = dropout_keys(model)
        assert keys.shape[0] == LAYERS and len({k.tobytes() for k in keys}) == LAYERS, \
            f"dropout keys are not one per layer: {keys}"
    vision = dataclasses.replace(loaded.config.vision_config, attention_dropout=0.5)
    model = CLIPModel(dataclasses.replace(loaded.config, vision_config=vision), rngs=nnx.Rngs(3))
    pixels = jnp.asarray(hf["pixels"])
    clean = model.vision_model(pixels, output_hidden_states=True).hidden_states
    model.train()
    first = model.vision_model(pixels, output_hidden_states=True).hidden_states
    second = model.vision_model(pixels, output_hidden_states=True).hidden_states
    for i in range(1, LAYERS + 1):
        changed = float(jnp.max(jnp.abs(first[i] - clean[i])))
        assert changed > 0, f"training-mode layer {i} output equals eval mode: no dropout applied"
    redraw = float(jnp.max(jnp.abs(first[-1] - second[-1])))
    assert redraw > 0, "two training-mode calls drew the same dropout masks"


FAMILIES = {"align": (AlignModel, ("text_model.encoder.layer.attention.self.query.kernel",)),
            "altclip": (AltCLIPModel, ("text_model.roberta.encoder.layers.attention.self.query.kernel",
                                       "vision_model.encoder.layers.self_attn.q_proj.kernel"))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_directories_of_other_families_through_scanned_models(family, tmp_path):
    """An HF ALIGN / AltCLIP directory loaded with ``scan_layers=True``: every transformer tower
    stacked, embeddings as transformers' (1e-5) and as the unrolled model's (1e-6), exported back
    to HF bit-exact, and its altjax directory read into either layout."""
    cls, stacked_keys = FAMILIES[family]
    tm = tiny_hf_dir(tmp_path / "hf", family)
    model = cls.from_pretrained(tmp_path / "hf", scan_layers=True)
    unrolled = cls.from_pretrained(tmp_path / "hf")
    shapes = engine.model_shapes(model)
    for key in stacked_keys:
        assert key in shapes, f"{family}: no stacked {key}; got {sorted(k for k in shapes if 'encoder' in k)[:4]}"
    layers = {key: shapes[key][0] for key in stacked_keys}
    text, pixels = (test_align if family == "align" else test_altclip).make_inputs(
        model.config, model.config.vision_config.image_size, seed=3)
    with torch.no_grad():
        ref = tm.eval()(**torch_inputs(text, pixels))
    for name, m in (("scanned", model), ("unrolled", unrolled)):
        out = m(**text, pixel_values=pixels)
        for field in ("image_embeds", "text_embeds"):
            assert_close(getattr(out, field), getattr(ref, field), atol=1e-5, what=f"{family} {name} {field} vs transformers")
            if name == "scanned":
                expected = getattr(unrolled(**text, pixel_values=pixels), field)
                assert_close(getattr(out, field), expected, atol=1e-6, what=f"{family} scanned vs unrolled {field}")
    model.save_pretrained(tmp_path / "out", format="hf")
    assert_round_trip(load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors"))
    assert "scan_layers" not in (tmp_path / "out" / "config.json").read_text(), "scan_layers leaked into HF config.json"
    model.save_pretrained(tmp_path / "altjax")
    for target in (False, True):
        back = cls.from_pretrained(tmp_path / "altjax", scan_layers=target)
        assert (stacked_keys[0] in engine.model_shapes(back)) == target, f"{family}: scan_layers={target} not honoured"
        assert_round_trip(torch_params(back), torch_params(unrolled))
    assert min(layers.values()) >= 2, f"{family}: stacks of {layers} layers test nothing"
