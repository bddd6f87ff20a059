"""AltCLIP's XLM-R text tower against transformers' AltCLIPTextModel and XLMRobertaModel, random weights.

Tolerances (float32): hidden states and pooled output 1e-5 absolute (values are O(1) after
LayerNorm); gradients 1e-4 relative to the largest reference gradient of each tensor; conversions
bit-exact.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from altjax.model_io import engine
from altjax.model_io.pretrained import ALTJAX_ONLY
from altjax.models.xlm_roberta import AltCLIPText, XLMRobertaConfig, create_position_ids, xlm_roberta_table
from helpers import assert_close, assert_rel_close, assert_round_trip, from_torch_state, torch_state

# Tiny configurations: widths, head counts, depths, odd intermediate sizes, another pad id (3, so
# position ids start at 4), two token types, the tanh GELU.
CONFIGS = {
    "h32-heads4-l2-i37": dict(
        vocab_size=99, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
        max_position_embeddings=40, project_dim=24,
    ),
    "h48-heads6-l3-i64-pad3-types2": dict(
        vocab_size=120, hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64,
        max_position_embeddings=24, project_dim=16, pad_token_id=3, type_vocab_size=2,
    ),
    "h24-heads2-l1-i31-gelu_new": dict(
        vocab_size=77, hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=31,
        max_position_embeddings=30, project_dim=40, hidden_act="gelu_new",
    ),
}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(name, **overrides):
    return transformers.AltCLIPTextConfig(**{**CONFIGS[name], **overrides})


def randomise_(module, seed):
    """Random weights of O(1) activations, LayerNorm affine and the padding rows included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm.weight" in name or "pre_LN.weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return module


def text_inputs(cfg, batch=3, length=9, seed=0, token_types=False):
    """``<s> ... </s>`` rows right-padded with ``pad_token_id`` to ``length``, the first unpadded."""
    rng = np.random.default_rng(seed)
    special = {cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id}
    words = np.array([t for t in range(cfg.vocab_size) if t not in special])
    ids = rng.choice(words, (batch, length))
    lengths = np.linspace(length, 2, batch).astype(int)
    ids[:, 0] = cfg.bos_token_id
    ids[np.arange(batch), lengths - 1] = cfg.eos_token_id
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    inputs = dict(input_ids=np.where(mask == 1, ids, cfg.pad_token_id), attention_mask=mask)
    if token_types:
        inputs["token_type_ids"] = rng.integers(0, cfg.type_vocab_size, (batch, length))
    return inputs


def to_torch(inputs):
    return {k: torch.tensor(v) for k, v in inputs.items()}


convert_state = functools.partial(from_torch_state, AltCLIPText, table=xlm_roberta_table)


def convert(torch_model, cfg):
    return convert_state(torch_state(torch_model), cfg)


def jitted(module):
    """A jitted forward of an NNX module (split/merge) with ``output_hidden_states=True``."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs, output_hidden_states=True)

    return lambda inputs: forward(state, {k: jnp.asarray(v) for k, v in inputs.items()})


def compare_outputs(out, ref, what, *, pooled=True):
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, what=f"{what} last_hidden_state")
    if pooled:
        assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, what=f"{what} pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states), f"{what}: number of hidden states differs"
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b, atol=1e-5, what=f"{what} hidden_states[{i}]")


def test_position_ids_follow_roberta():
    ids = np.array([[0, 5, 6, 2, 1, 1], [0, 1, 7, 2, 9, 1]])
    np.testing.assert_array_equal(create_position_ids(ids, 1), [[2, 3, 4, 5, 1, 1], [2, 1, 3, 4, 5, 1]])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_eval_matches_altclip_text_model(name, masked):
    hc = hf_config(name)
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AltCLIPTextModel(hc), seed=1).eval()
    inputs = text_inputs(cfg, seed=2, token_types=cfg.type_vocab_size > 1)
    if not masked:
        # The reference then attends the pads too; the padded rows' outputs change (checked below).
        del inputs["attention_mask"]
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
        ref_roberta = tm.roberta(**to_torch(inputs), output_hidden_states=True)
    model = convert(tm, cfg)
    compare_outputs(jitted(model)(inputs), ref, f"{name} AltCLIPText")
    compare_outputs(jitted(model.roberta)(inputs), ref_roberta, f"{name} roberta", pooled=False)
    if not masked:
        with torch.no_grad():
            masked_ref = tm(**to_torch(text_inputs(cfg, seed=2, token_types=cfg.type_vocab_size > 1)))
        moved = np.abs(ref.pooler_output.numpy() - masked_ref.pooler_output.numpy()).max(-1)
        assert moved[0] <= 1e-6 and np.all(moved[1:] > 1e-3), f"only padded rows should change without a mask: {moved}"


@pytest.mark.parametrize("name", ["h32-heads4-l2-i37", "h48-heads6-l3-i64-pad3-types2"])
def test_sequences_at_the_position_limit(name):
    hc = hf_config(name)
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    length = cfg.max_position_embeddings - cfg.pad_token_id - 1
    tm = randomise_(transformers.AltCLIPTextModel(hc), seed=3).eval()
    inputs = text_inputs(cfg, batch=2, length=length, seed=4)
    assert int(create_position_ids(inputs["input_ids"], cfg.pad_token_id).max()) == cfg.max_position_embeddings - 1
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    compare_outputs(jitted(convert(tm, cfg))(inputs), ref, f"{name} at {length} tokens")


def test_given_position_and_token_type_ids_are_used():
    hc = hf_config("h48-heads6-l3-i64-pad3-types2")
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AltCLIPTextModel(hc), seed=5).eval()
    inputs = text_inputs(cfg, seed=6, token_types=True)
    inputs["position_ids"] = np.broadcast_to(np.arange(9)[::-1] + 5, (3, 9)).copy()
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    compare_outputs(jitted(convert(tm, cfg))(inputs), ref, "given position/token type ids")


def test_bare_encoder_matches_xlm_roberta_model():
    """transformers' XLMRobertaModel is the same encoder with ``encoder.layer.{i}`` keys (the alias)."""
    name = "h32-heads4-l2-i37"
    cfg = XLMRobertaConfig.from_hf(hf_config(name).to_dict())
    fields = {k: v for k, v in CONFIGS[name].items() if k != "project_dim"}
    xc = transformers.XLMRobertaConfig(**fields, layer_norm_eps=cfg.layer_norm_eps, type_vocab_size=1)
    xm = randomise_(transformers.XLMRobertaModel(xc, add_pooling_layer=False), seed=7).eval()
    head = torch_state(randomise_(transformers.AltCLIPTextModel(hf_config(name)), seed=8))
    state = {"roberta." + k: v for k, v in torch_state(xm).items()}
    assert any(".encoder.layer.0." in k for k in state), "XLMRobertaModel should use the encoder.layer spelling"
    state.update({k: v for k, v in head.items() if not k.startswith("roberta.")})
    inputs = text_inputs(cfg, seed=9)
    with torch.no_grad():
        ref = xm(**to_torch(inputs), output_hidden_states=True)
    compare_outputs(jitted(convert_state(state, cfg).roberta)(inputs), ref, "XLMRobertaModel", pooled=False)


@pytest.mark.parametrize("name", ["h32-heads4-l2-i37", "h48-heads6-l3-i64-pad3-types2"])
def test_train_mode_outputs_and_gradients_match(name):
    hc = hf_config(name, **NO_DROPOUT)
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AltCLIPTextModel(hc), seed=10).train()
    model = convert(tm, cfg)
    model.train()
    inputs = text_inputs(cfg, batch=4, length=11, seed=11, token_types=cfg.type_vocab_size > 1)
    r_hidden = np.random.default_rng(12).normal(size=(4, 11, cfg.project_dim)).astype(np.float32)

    ref = tm(**to_torch(inputs), output_hidden_states=True)
    (ref.last_hidden_state * torch.tensor(r_hidden)).sum().backward()
    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_out(params, inputs):
        out = nnx.merge(graphdef, params, rest)(**inputs, output_hidden_states=True)
        return jnp.sum(out.last_hidden_state * r_hidden), out

    (_, out), grads = jax.value_and_grad(loss_and_out, has_aux=True)(params, {k: jnp.asarray(v) for k, v in inputs.items()})
    compare_outputs(out, ref, f"{name} train")
    flat = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    torch_grads = engine.nnx_to_torch(flat, xlm_roberta_table(cfg), on_disk=False)
    check_gradients(torch_grads, ref_grads, what=name)
    # Pad tokens look up row pad of both tables; as with padding_idx, neither row gets a gradient.
    for table in ("word_embeddings", "position_embeddings"):
        row = torch_grads[f"roberta.embeddings.{table}.weight"][cfg.pad_token_id]
        assert not np.any(row), f"{table} padding row received a gradient (max {np.abs(row).max():.3e})"


def check_gradients(grads, ref_grads, *, what):
    """Every gradient within 1e-4 of its tensor's largest reference gradient.

    The attention key bias is the exception: its true gradient is zero (adding a constant to every
    key logit of a query leaves the softmax unchanged), so both sides are rounding noise and are
    measured against the largest gradient of the whole model instead.
    """
    assert set(grads) == set(ref_grads), f"gradient key sets differ: {sorted(set(grads) ^ set(ref_grads))}"
    model_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for key, g in ref_grads.items():
        if key.endswith("attention.self.key.bias"):
            for side, v in (("altjax", grads[key]), ("torch", g)):
                noise = float(np.max(np.abs(v))) / model_scale
                assert noise <= 1e-4, f"{what} {side} gradient of {key} (exactly 0 in theory) is {noise:.3e} of the largest"
            continue
        assert_rel_close(grads[key], g, rtol=1e-4, what=f"{what} gradient of {key}")


def test_train_mode_dropout_is_active_and_eval_restores():
    hc = hf_config("h32-heads4-l2-i37", attention_probs_dropout_prob=0.1)
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    model = convert(randomise_(transformers.AltCLIPTextModel(hc), seed=13).eval(), cfg)
    inputs = {k: jnp.asarray(v) for k, v in text_inputs(cfg, seed=14).items()}
    before = model(**inputs).last_hidden_state
    model.train()
    dropped = model(**inputs).last_hidden_state
    model.eval()
    after = model(**inputs).last_hidden_state
    assert float(jnp.max(jnp.abs(dropped - before))) > 1e-2, "train() did not turn dropout on"
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg="eval() did not turn dropout off")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_exact(name):
    hc = hf_config(name)
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    state = torch_state(randomise_(transformers.AltCLIPTextModel(hc), seed=15))
    model = convert_state(state, cfg)
    back = engine.nnx_to_torch(engine.model_params(model), xlm_roberta_table(cfg), on_disk=False)
    assert_round_trip(back, state)


def test_on_disk_spelling_and_stale_buffers_are_accepted():
    hc = hf_config("h32-heads4-l2-i37")
    cfg = XLMRobertaConfig.from_hf(hc.to_dict())
    state = torch_state(randomise_(transformers.AltCLIPTextModel(hc), seed=16))
    disk = {k.replace("encoder.layers.", "encoder.layer."): v for k, v in state.items()}
    disk["roberta.embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
    disk["roberta.embeddings.token_type_ids"] = np.zeros((1, cfg.max_position_embeddings), np.int64)
    a, b = engine.model_params(convert_state(disk, cfg)), engine.model_params(convert_state(state, cfg))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs when loaded from the on-disk spelling")


def test_config_round_trip_and_defaults():
    for hc in [transformers.AltCLIPTextConfig(), hf_config("h48-heads6-l3-i64-pad3-types2")]:
        d = hc.to_dict()
        assert XLMRobertaConfig.from_hf(d).to_hf() == d, f"{type(hc).__name__} dict changed in the round trip"
    ref = transformers.AltCLIPTextConfig().to_dict()
    ours = XLMRobertaConfig()
    # scan_layers is altjax's own (how the layers run), never written to an HF config.
    own = {f for f, field in ours.__dataclass_fields__.items() if field.metadata.get(ALTJAX_ONLY)}
    assert own == {"scan_layers"}, f"altjax-only fields {sorted(own)}"
    for f in ours.__dataclass_fields__:
        if f != "extra" and f not in own:
            assert getattr(ours, f) == ref[f], f"default {f}: {getattr(ours, f)!r} != HF {ref[f]!r}"
    assert set(ours.__dataclass_fields__) - {"extra"} - own == set(transformers.AltCLIPTextConfig.__annotations__) - {
        "model_type", "base_config_key"
    }, "XLMRobertaConfig fields differ from AltCLIPTextConfig's"
    back = transformers.AltCLIPTextConfig.from_dict(XLMRobertaConfig(**CONFIGS["h32-heads4-l2-i37"]).to_hf())
    assert back.hidden_size == 32 and back.project_dim == 24 and back.model_type == "altclip_text_model"
    with pytest.raises(ValueError, match="not a multiple"):
        XLMRobertaConfig(hidden_size=30, num_attention_heads=4)
