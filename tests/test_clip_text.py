"""CLIP's text transformer (AltCLIP's distillation teacher) against transformers, random weights.

References: ``CLIPTextModelWithProjection`` (the text tower and ``text_projection``),
``CLIPTextModel`` and ``CLIPModel.get_text_features``. Tolerances (float32): hidden states, pooled
and projected outputs 1e-5 absolute at tiny sizes (O(1) values after LayerNorm), 1e-4 at the full
ViT-L/14 text size; gradients 1e-4 relative to the largest reference gradient of each tensor; bf16
compute: cosine >= 0.999 to the fp32 reference; conversions bit-exact.
"""
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
from altjax.model_io.directories import CheckpointError
from altjax.models.clip_text import (
    CLIPText,
    CLIPTextConfig,
    CLIPTextTeacher,
    clip_teacher_table,
    clip_text_table,
    eos_positions,
)
from helpers import assert_close, assert_rel_close, assert_round_trip, cosine, from_torch_state, torch_state

# Tiny configurations with both pooling conventions: end-of-text = the last id of the vocabulary
# (CLIP's layout, 49407 of 49408), the legacy eos_token_id=2 (pooled at the largest id), and an
# end-of-text token that is also the pad token and not the largest id (first occurrence wins).
CONFIGS = {
    "h32-heads4-l2-eos98": dict(
        vocab_size=99, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
        max_position_embeddings=16, projection_dim=24, bos_token_id=97, eos_token_id=98, pad_token_id=0,
    ),
    "h48-heads6-l3-legacy-eos2": dict(
        vocab_size=120, hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64,
        max_position_embeddings=20, projection_dim=40, bos_token_id=118, eos_token_id=2, pad_token_id=1,
    ),
    "h24-heads2-l1-eos50-pads-with-eos-gelu": dict(
        vocab_size=77, hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=31,
        max_position_embeddings=12, projection_dim=16, bos_token_id=49, eos_token_id=50, pad_token_id=50,
        hidden_act="gelu", layer_norm_eps=1e-6,
    ),
}


def hf_config(name, **overrides):
    return transformers.CLIPTextConfig(**{**CONFIGS[name], **overrides})


def end_token(cfg):
    """The token the tokenizer ends every text with: the largest id for the legacy convention."""
    return cfg.vocab_size - 1 if cfg.eos_token_id == 2 else cfg.eos_token_id


def randomise_(module, seed):
    """Random weights giving O(1) activations, LayerNorm affine included (any CLIP module)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            elif p.ndim > 1:  # Linear (out, in), and a CLIPModel's patch conv: unit-variance outputs
                p.copy_(noise / p[0].numel() ** 0.5)
            else:  # a CLIPModel's logit_scale
                p.copy_(noise)
    return module


def text_inputs(cfg, batch=3, length=9, seed=0, left=False):
    """``bos ... end`` rows padded with ``pad_token_id`` to ``length`` (right, or left), the first full.

    Word ids avoid the special ids; the legacy config's rows also hold id 2 (its eos_token_id,
    which is then an ordinary word: pooling goes by the largest id).
    """
    rng = np.random.default_rng(seed)
    special = {cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, end_token(cfg)}
    words = np.array([t for t in range(cfg.vocab_size) if t not in special])
    ids = rng.choice(words, (batch, length))
    lengths = np.linspace(length, 3, batch).astype(int)
    ids[:, 0] = cfg.bos_token_id
    ids[np.arange(batch), lengths - 1] = end_token(cfg)
    if cfg.eos_token_id == 2:
        ids[:, 1] = 2
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, cfg.pad_token_id)
    if left:
        shift = length - lengths
        ids = np.stack([np.roll(r, s) for r, s in zip(ids, shift)])
        mask = np.stack([np.roll(r, s) for r, s in zip(mask, shift)])
    return dict(input_ids=ids, attention_mask=mask)


def to_torch(inputs):
    return {k: torch.tensor(v) for k, v in inputs.items()}


def teacher_config(hc):
    return CLIPTextConfig.from_hf(hc.to_dict())


def convert_state(state, cfg, table=clip_teacher_table, module=CLIPTextTeacher, dtype=jnp.float32):
    return from_torch_state(module, state, cfg, dtype, table=table)


def setup(name, seed, **overrides):
    hc = hf_config(name, **overrides)
    cfg = teacher_config(hc)
    tm = randomise_(transformers.CLIPTextModelWithProjection(hc), seed=seed).eval()
    return cfg, tm, convert_state(torch_state(tm), cfg)


def jitted(module, method="__call__", **kwargs):
    """A jitted call of an NNX module's method (split/merge)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def call(state, inputs):
        return getattr(nnx.merge(graphdef, state), method)(**inputs, **kwargs)

    return lambda inputs: call(state, {k: jnp.asarray(v) for k, v in inputs.items()})


def compare(out, features, ref, what, atol=1e-5, hidden_states=True):
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=atol, what=f"{what} last_hidden_state")
    assert_close(features, ref.text_embeds, atol=atol, what=f"{what} projected pooled output")
    if hidden_states:
        assert len(out.hidden_states) == len(ref.hidden_states), f"{what}: number of hidden states differs"
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_close(a, b, atol=atol, what=f"{what} hidden_states[{i}]")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_eval_matches_clip_text_model_with_projection(name, masked):
    cfg, tm, model = setup(name, seed=1)
    inputs = text_inputs(cfg, seed=2)
    if not masked:
        # Right padding: the causal mask alone already hides the pads from every real token.
        del inputs["attention_mask"]
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
        ref_tower = tm.text_model(**to_torch(inputs))
    out = jitted(model, output_hidden_states=True)(inputs)
    compare(out, jitted(model, "get_text_features")(inputs), ref, f"{name} ({'masked' if masked else 'no mask'})")
    assert_close(out.pooler_output, ref_tower.pooler_output, atol=1e-5, what=f"{name} pooler_output")


@pytest.mark.parametrize("name", ["h32-heads4-l2-eos98", "h48-heads6-l3-legacy-eos2"])
def test_left_padding_matches_eager_attention(name):
    """Left pads are queries with no visible key. The reference's eager attention then averages
    every key, as altjax does; its default sdpa path gives those (unread) rows other values, so
    against it only the real tokens and the pooled output are compared."""
    hc = hf_config(name)
    cfg = teacher_config(hc)
    sdpa = randomise_(transformers.CLIPTextModelWithProjection(hc), seed=3).eval()
    eager = randomise_(transformers.CLIPTextModelWithProjection(hc), seed=3).eval()
    eager.set_attn_implementation("eager")
    inputs = text_inputs(cfg, seed=4, left=True)
    with torch.no_grad():
        ref_eager = eager(**to_torch(inputs), output_hidden_states=True)
        ref_sdpa = sdpa(**to_torch(inputs))
    model = convert_state(torch_state(eager), cfg)
    out = jitted(model, output_hidden_states=True)(inputs)
    features = jitted(model, "get_text_features")(inputs)
    compare(out, features, ref_eager, f"{name} left-padded vs eager")
    real = inputs["attention_mask"].astype(bool)
    assert_close(np.asarray(out.last_hidden_state)[real], ref_sdpa.last_hidden_state.numpy()[real], atol=1e-5,
                 what=f"{name} left-padded real tokens vs sdpa")
    assert_close(features, ref_sdpa.text_embeds, atol=1e-5, what=f"{name} left-padded projection vs sdpa")


def test_pooled_position_conventions():
    ids = np.array([[49406, 320, 49407, 49407, 49407], [49406, 49407, 1, 1, 1], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(eos_positions(ids, 49407), [2, 1, 0])
    legacy = np.array([[0, 2, 9, 4, 9], [7, 3, 2, 1, 1]])
    np.testing.assert_array_equal(eos_positions(legacy, 2), [2, 0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequences_at_the_position_limit(name):
    cfg, tm, model = setup(name, seed=5)
    inputs = text_inputs(cfg, batch=2, length=cfg.max_position_embeddings, seed=6)
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    compare(jitted(model, output_hidden_states=True)(inputs), jitted(model, "get_text_features")(inputs), ref,
            f"{name} at {cfg.max_position_embeddings} tokens")
    too_long = text_inputs(cfg, batch=1, length=cfg.max_position_embeddings + 1, seed=7)
    with pytest.raises(ValueError, match=rf"input_ids has sequence length {cfg.max_position_embeddings + 1} but max_position_embeddings is {cfg.max_position_embeddings}"):
        model(**{k: jnp.asarray(v) for k, v in too_long.items()})


def test_given_position_ids_are_used():
    cfg, tm, model = setup("h32-heads4-l2-eos98", seed=8)
    inputs = text_inputs(cfg, seed=9)
    inputs["position_ids"] = np.broadcast_to(np.arange(9)[::-1] + 3, (3, 9)).copy()
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    compare(jitted(model, output_hidden_states=True)(inputs), jitted(model, "get_text_features")(inputs), ref,
            "given position ids")


def test_bare_text_tower_matches_clip_text_model():
    name = "h48-heads6-l3-legacy-eos2"
    hc = hf_config(name)
    cfg = teacher_config(hc)
    tm = randomise_(transformers.CLIPTextModel(hc), seed=10).eval()
    inputs = text_inputs(cfg, seed=11)
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    out = jitted(convert_state(torch_state(tm), cfg, clip_text_table, CLIPText), output_hidden_states=True)(inputs)
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, what="CLIPTextModel last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, what="CLIPTextModel pooler_output")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(a, b, atol=1e-5, what=f"CLIPTextModel hidden_states[{i}]")


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


@pytest.mark.parametrize("name", ["h32-heads4-l2-eos98", "h48-heads6-l3-legacy-eos2"])
def test_train_mode_outputs_and_gradients_match(name):
    cfg, tm, model = setup(name, seed=12)
    tm.train()
    model.train()
    inputs = text_inputs(cfg, batch=4, length=11, seed=13)
    rng = np.random.default_rng(14)
    r_embeds = rng.normal(size=(4, cfg.projection_dim)).astype(np.float32)
    r_hidden = rng.normal(size=(4, 11, cfg.hidden_size)).astype(np.float32)

    ref = tm(**to_torch(inputs), output_hidden_states=True)
    ((ref.text_embeds * torch.tensor(r_embeds)).sum() + (ref.last_hidden_state * torch.tensor(r_hidden)).sum()).backward()
    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_out(params, inputs):
        teacher = nnx.merge(graphdef, params, rest)
        out = teacher(**inputs, output_hidden_states=True)
        features = teacher.text_projection(out.pooler_output)
        return jnp.sum(features * r_embeds) + jnp.sum(out.last_hidden_state * r_hidden), (out, features)

    (_, (out, features)), grads = jax.value_and_grad(loss_and_out, has_aux=True)(
        params, {k: jnp.asarray(v) for k, v in inputs.items()}
    )
    compare(out, features, ref, f"{name} train")
    flat = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    check_gradients(engine.nnx_to_torch(flat, clip_teacher_table(cfg), on_disk=False), ref_grads, what=name)


def test_train_mode_attention_dropout_is_active_and_eval_restores():
    cfg, _, model = setup("h32-heads4-l2-eos98", seed=15, attention_dropout=0.2)
    inputs = text_inputs(cfg, seed=16)
    before = jitted(model, "get_text_features")(inputs)
    model.train()
    dropped = jitted(model, "get_text_features")(inputs)
    model.eval()
    after = jitted(model, "get_text_features")(inputs)
    assert float(jnp.max(jnp.abs(dropped - before))) > 1e-2, "train() did not turn attention dropout on"
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg="eval() did not turn dropout off")


def tiny_clip_model(name, seed):
    hc = transformers.CLIPConfig(
        text_config=hf_config(name).to_dict(),
        vision_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=20,
    )
    return randomise_(transformers.CLIPModel(hc), seed=seed).eval()


@pytest.mark.parametrize("name", ["h32-heads4-l2-eos98", "h48-heads6-l3-legacy-eos2"])
def test_round_trip_is_bit_exact(name):
    """From a CLIPModel state dict: the text keys convert both ways unchanged, the rest is ignored."""
    cm = tiny_clip_model(name, seed=17)
    state = torch_state(cm)
    cfg = CLIPTextConfig.from_hf({**cm.config.text_config.to_dict(), "projection_dim": cm.config.projection_dim})
    model = convert_state(state, cfg)
    back = engine.nnx_to_torch(engine.model_params(model), clip_teacher_table(cfg), on_disk=False)
    teacher_keys = {k for k in state if k.startswith("text_model.") or k == "text_projection.weight"}
    assert_round_trip(back, {k: state[k] for k in teacher_keys})
    stale = {**state, "text_model.embeddings.position_ids": np.arange(cfg.max_position_embeddings)[None]}
    for k, v in engine.model_params(convert_state(stale, cfg)).items():
        np.testing.assert_array_equal(v, engine.model_params(model)[k], err_msg=f"{k} differs with a stale buffer")


def test_from_pretrained_clip_model_and_text_model_with_projection(tmp_path):
    name = "h48-heads6-l3-legacy-eos2"
    cm = tiny_clip_model(name, seed=18)
    cm.save_pretrained(tmp_path / "clip")
    cfg = teacher_config(hf_config(name))
    inputs = text_inputs(cfg, seed=19)
    with torch.no_grad():
        ref = cm.get_text_features(**to_torch(inputs)).pooler_output
    teacher = CLIPTextTeacher.from_pretrained(tmp_path / "clip")
    assert teacher.config.projection_dim == 20, "the projection width is CLIPModel's projection_dim"
    assert_close(jitted(teacher, "get_text_features")(inputs), ref, atol=1e-5, what="from_pretrained(CLIPModel) features")
    back = engine.nnx_to_torch(engine.model_params(teacher), clip_teacher_table(teacher.config), on_disk=False)
    state = torch_state(cm)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=f"{k} differs after from_pretrained")

    tp = randomise_(transformers.CLIPTextModelWithProjection(hf_config(name)), seed=20).eval()
    tp.save_pretrained(tmp_path / "text")
    with torch.no_grad():
        ref = tp(**to_torch(inputs)).text_embeds
    teacher = CLIPTextTeacher.from_pretrained(tmp_path / "text")
    assert_close(jitted(teacher, "get_text_features")(inputs), ref, atol=1e-5,
                 what="from_pretrained(CLIPTextModelWithProjection) features")

    transformers.CLIPVisionModel(cm.config.vision_config).save_pretrained(tmp_path / "vision")
    with pytest.raises(CheckpointError, match="expected 'clip_text_model' or 'clip'"):
        CLIPTextTeacher.from_pretrained(tmp_path / "vision")


@pytest.mark.parametrize("name", ["h32-heads4-l2-eos98", "h48-heads6-l3-legacy-eos2"])
def test_bfloat16_compute_is_close(name):
    cfg, tm, _ = setup(name, seed=21)
    inputs = text_inputs(cfg, seed=22)
    with torch.no_grad():
        ref = tm(**to_torch(inputs))
    model = convert_state(torch_state(tm), cfg, dtype=jnp.bfloat16)
    features = jitted(model, "get_text_features")(inputs)
    assert features.dtype == jnp.bfloat16, f"compute dtype is {features.dtype}, not bfloat16"
    assert all(v.dtype == jnp.float32 for v in engine.model_params(model).values()), "parameters must stay float32"
    cos = cosine(np.asarray(features, np.float32), ref.text_embeds)
    assert cos.min() >= 0.999, f"{name} bf16 projected features: min cosine {cos.min():.5f} < 0.999"


def test_config_round_trip_and_defaults():
    for hc in [transformers.CLIPTextConfig(), hf_config("h48-heads6-l3-legacy-eos2")]:
        d = hc.to_dict()
        assert CLIPTextConfig.from_hf(d).to_hf() == d, f"{type(hc).__name__} dict changed in the round trip"
    ref = transformers.CLIPTextConfig().to_dict()
    ours = CLIPTextConfig()
    # scan_layers is altjax's own (how the layers run), never written to an HF config.
    own = {f for f, field in ours.__dataclass_fields__.items() if field.metadata.get(ALTJAX_ONLY)}
    assert own == {"scan_layers"}, f"altjax-only fields {sorted(own)}"
    for f in ours.__dataclass_fields__:
        if f != "extra" and f not in own:
            assert getattr(ours, f) == ref[f], f"default {f}: {getattr(ours, f)!r} != HF {ref[f]!r}"
    assert set(ours.__dataclass_fields__) - {"extra"} - own == set(transformers.CLIPTextConfig.__annotations__) - {
        "model_type", "base_config_key"
    }, "CLIPTextConfig fields differ from transformers.CLIPTextConfig's"
    back = transformers.CLIPTextConfig.from_dict(CLIPTextConfig(**CONFIGS["h32-heads4-l2-eos98"]).to_hf())
    assert back.hidden_size == 32 and back.eos_token_id == 98 and back.model_type == "clip_text_model"
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="one int"):
        CLIPTextConfig(eos_token_id=[2, 49407])


def test_full_size_vit_l14_text_tower_matches(capsys):
    """CLIP ViT-L/14's text tower (768 wide, 12 layers, 12 heads, 3072, projection 768), transformers'
    random init, batch 2 of 77 tokens padded with the end-of-text token as CLIP's tokenizer does."""
    hc = transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
    )
    cfg = teacher_config(hc)
    torch.manual_seed(23)
    tm = transformers.CLIPTextModelWithProjection(hc).eval()
    ids = np.full((2, 77), 49407)
    rng = np.random.default_rng(24)
    ids[0, :13] = [49406, *rng.integers(0, 49406, 11), 49407]
    ids[1, :40] = [49406, *rng.integers(0, 49406, 38), 49407]
    inputs = dict(input_ids=ids, attention_mask=(np.arange(77)[None] < np.array([[13], [40]])).astype(np.int64))
    start = time.perf_counter()
    with torch.no_grad():
        ref = tm(**to_torch(inputs))
    torch_s = time.perf_counter() - start
    model = convert_state(torch_state(tm), cfg)
    del tm
    start = time.perf_counter()
    out = jax.block_until_ready(jitted(model)(inputs))
    jax_s = time.perf_counter() - start
    features = model.text_projection(out.pooler_output)
    proj = assert_close(features, ref.text_embeds, atol=1e-4, what="ViT-L/14 text projected features")
    hidden = assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-4, what="ViT-L/14 text last_hidden_state")
    with capsys.disabled():
        print(f"\nViT-L/14 text: projected {proj:.2e}, last_hidden_state {hidden:.2e}; torch {torch_s:.1f}s, "
              f"jax (jit incl.) {jax_s:.1f}s")
