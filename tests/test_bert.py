"""The BERT text tower against transformers' AlignTextModel / BertModel with random weights.

Tolerances (float32): hidden states and pooler 1e-5 absolute (values are O(1) after LayerNorm);
gradients 1e-4 relative to the largest reference gradient of each tensor; conversions bit-exact.
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
from altjax.models.bert import Bert, BertConfig, bert_table
from helpers import assert_close, assert_rel_close, assert_round_trip, from_torch_state, torch_state

# Tiny configurations: different widths, head counts, depths, odd intermediate sizes.
CONFIGS = {
    "h32-heads4-l2-i37": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37),
    "h48-heads3-l3-i64": dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=64),
    "h24-heads2-l1-i31-types3": dict(
        hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=31, type_vocab_size=3
    ),
}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(name, **overrides):
    return transformers.AlignTextConfig(vocab_size=99, max_position_embeddings=40, **CONFIGS[name], **overrides)


def randomise_(module, seed):
    """Random weights of O(1) activations, LayerNorm affine included (the HF init leaves it at 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return module


def text_inputs(cfg, batch=3, length=9, seed=0, with_positions=False):
    """Right-padded token ids (pad id 0) with their mask, random token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (batch, length))
    lengths = np.linspace(length, 2, batch).astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, cfg.type_vocab_size, (batch, length)))
    if with_positions:
        inputs["position_ids"] = np.broadcast_to(np.arange(length) + 3, (batch, length)).copy()
    return inputs


def to_torch(inputs):
    return {k: torch.tensor(v) for k, v in inputs.items()}


convert_state = functools.partial(from_torch_state, Bert, table=bert_table)


def convert(torch_model, cfg):
    return convert_state(torch_state(torch_model), cfg)


def jitted(model):
    """A jitted forward of the NNX model (split/merge), returning the TowerOutput."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs, output_hidden_states=True)

    return lambda inputs: forward(state, {k: jnp.asarray(v) for k, v in inputs.items()})


def compare_outputs(out, ref, what):
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, what=f"{what} last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, what=f"{what} pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states), f"{what}: number of hidden states differs"
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b, atol=1e-5, what=f"{what} hidden_states[{i}]")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("with_positions", [False, True], ids=["default-positions", "given-positions"])
def test_eval_matches_align_text_model(name, with_positions):
    hc = hf_config(name)
    cfg = BertConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AlignTextModel(hc), seed=1).eval()
    inputs = text_inputs(cfg, with_positions=with_positions)
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    compare_outputs(jitted(convert(tm, cfg))(inputs), ref, f"{name} eval")


def test_defaults_without_mask_and_token_types_match():
    hc = hf_config("h32-heads4-l2-i37")
    cfg = BertConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AlignTextModel(hc), seed=2).eval()
    ids = text_inputs(cfg, seed=3)["input_ids"]
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids), output_hidden_states=True)
    model = convert(tm, cfg)
    compare_outputs(jitted(model)({"input_ids": ids}), ref, "no mask, no token types")
    with pytest.raises(ValueError, match="Bert: input_ids has sequence length 41 but max_position_embeddings is 40"):
        model(np.ones((1, 41), np.int32))


def test_eval_matches_bert_model():
    hc = transformers.BertConfig(vocab_size=99, max_position_embeddings=40, **CONFIGS["h48-heads3-l3-i64"])
    cfg = BertConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.BertModel(hc), seed=4).eval()
    inputs = text_inputs(cfg, seed=5)
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    compare_outputs(jitted(convert(tm, cfg))(inputs), ref, "BertModel eval")


@pytest.mark.parametrize("name", ["h32-heads4-l2-i37", "h48-heads3-l3-i64"])
def test_train_mode_outputs_and_gradients_match(name):
    hc = hf_config(name, **NO_DROPOUT)
    cfg = BertConfig.from_hf(hc.to_dict())
    tm = randomise_(transformers.AlignTextModel(hc), seed=6).train()
    model = convert(tm, cfg)
    model.train()
    inputs = text_inputs(cfg, batch=4, length=11, seed=7)
    rng = np.random.default_rng(8)
    r_hidden = rng.normal(size=(4, 11, cfg.hidden_size)).astype(np.float32)
    r_pool = rng.normal(size=(4, cfg.hidden_size)).astype(np.float32)

    ref = tm(**to_torch(inputs), output_hidden_states=True)
    (ref.last_hidden_state * torch.tensor(r_hidden)).sum().add((ref.pooler_output * torch.tensor(r_pool)).sum()).backward()
    ref_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_out(params, inputs):
        out = nnx.merge(graphdef, params, rest)(**inputs, output_hidden_states=True)
        loss = jnp.sum(out.last_hidden_state * r_hidden) + jnp.sum(out.pooler_output * r_pool)
        return loss, out

    (_, out), grads = jax.value_and_grad(loss_and_out, has_aux=True)(params, {k: jnp.asarray(v) for k, v in inputs.items()})
    compare_outputs(out, ref, f"{name} train")
    flat = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    torch_grads = engine.nnx_to_torch(flat, bert_table(cfg), on_disk=False)
    check_gradients(torch_grads, ref_grads, what=name)
    # The padding row (id 0 appears in the padded inputs) gets no gradient, as with padding_idx.
    assert not np.any(torch_grads["embeddings.word_embeddings.weight"][0]), "padding row received a gradient"


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
    hc = hf_config("h32-heads4-l2-i37")
    cfg = BertConfig.from_hf(hc.to_dict())
    model = convert(randomise_(transformers.AlignTextModel(hc), seed=9).eval(), cfg)
    inputs = {k: jnp.asarray(v) for k, v in text_inputs(cfg, seed=10).items()}
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
    cfg = BertConfig.from_hf(hc.to_dict())
    state = torch_state(randomise_(transformers.AlignTextModel(hc), seed=11))
    model = convert_state(state, cfg)
    back = engine.nnx_to_torch(engine.model_params(model), bert_table(cfg), on_disk=False)
    assert_round_trip(back, state)


def test_legacy_names_and_stale_buffers_are_accepted():
    hc = hf_config("h32-heads4-l2-i37")
    cfg = BertConfig.from_hf(hc.to_dict())
    state = torch_state(randomise_(transformers.AlignTextModel(hc), seed=12))
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    assert sum("gamma" in k for k in legacy) == 1 + 2 * cfg.num_hidden_layers
    legacy["embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
    legacy["embeddings.token_type_ids"] = np.zeros((1, cfg.max_position_embeddings), np.int64)
    a, b = engine.model_params(convert_state(legacy, cfg)), engine.model_params(convert_state(state, cfg))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs when loaded from legacy names")


def test_missing_and_misshapen_keys_are_named():
    hc = hf_config("h32-heads4-l2-i37")
    cfg = BertConfig.from_hf(hc.to_dict())
    state = torch_state(transformers.AlignTextModel(hc))
    del state["encoder.layer.1.output.dense.bias"]
    state["pooler.dense.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(engine.ConversionError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        convert_state(state, cfg)
    del state["pooler.dense.weight"]
    state["encoder.layer.1.output.dense.bias"] = np.zeros(32, np.float32)
    state["pooler.dense.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(engine.ConversionError, match=r"pooler\.dense\.weight: .* has \(32, 31\), the model expects \(32, 32\)"):
        convert_state(state, cfg)


def test_config_round_trip_and_defaults():
    for hc in [transformers.AlignTextConfig(), hf_config("h48-heads3-l3-i64"), transformers.BertConfig()]:
        d = hc.to_dict()
        assert BertConfig.from_hf(d).to_hf() == d, f"{type(hc).__name__} dict changed in the round trip"
    ref = transformers.AlignTextConfig().to_dict()
    ours = BertConfig()
    # scan_layers is altjax's own (how the layers run), never written to an HF config.
    own = {f for f, field in ours.__dataclass_fields__.items() if field.metadata.get(ALTJAX_ONLY)}
    assert own == {"scan_layers"}, f"altjax-only fields {sorted(own)}"
    for f in ours.__dataclass_fields__:
        if f != "extra" and f not in own:
            assert getattr(ours, f) == ref[f], f"default {f}: {getattr(ours, f)!r} != HF {ref[f]!r}"
    # Hashable despite the dict of extra keys: the config is a static attribute of the module.
    assert hash(nnx.graphdef(Bert(BertConfig(**CONFIGS["h32-heads4-l2-i37"], extra={"k": [1]}), rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=30, num_attention_heads=4)


# Real sentences for the real-weights check (English with punctuation, casing, accents, numbers).
REAL_SENTENCES = [
    "A photo of a cat sleeping on a red sofa.",
    "Two dogs run along the beach at sunset, chasing a ball!",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
    "Crème brûlée is a dessert with a caramelised sugar top.",
]


def test_real_minilm_weights_match_bert_model():
    """Real BERT weights (all-MiniLM-L6-v2: 6 layers, 384 wide, the ALIGN text tower's layout) read
    from the package's model.safetensors with altjax.model_io, on real tokenised sentences."""
    from altjax.model_io.directories import read_config
    from altjax.model_io.hf_weights import open_weights
    from helpers import bert_vocab_dir

    directory = bert_vocab_dir()
    cfg = BertConfig.from_hf(read_config(directory))
    assert cfg.hidden_size == 384 and cfg.num_hidden_layers == 6, f"unexpected MiniLM config {cfg}"
    model = Bert(cfg, rngs=nnx.Rngs(0))
    engine.load_params(model, engine.torch_to_nnx(open_weights(directory), bert_table(cfg), engine.model_shapes(model)))
    tokenizer = transformers.BertTokenizerFast.from_pretrained(directory)
    inputs = dict(tokenizer(REAL_SENTENCES, padding=True, return_tensors="np"))
    tm = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = tm(**to_torch(inputs), output_hidden_states=True)
    out = jitted(model)(inputs)
    diff = assert_close(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-5,
                        what="MiniLM last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, what="MiniLM pooler_output")
    print(f"real MiniLM weights: max |altjax - transformers| of last_hidden_state {diff:.2e}")
