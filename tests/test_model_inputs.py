"""Clear errors at the model API boundary (``altjax.models.inputs``).

Every public entry point (the three dual encoders, their ``get_text_features`` /
``get_image_features``, the CLIP text teacher and the stand-alone towers) rejects wrong inputs
with a ``ValueError`` naming the model, the argument and what was expected. Called eagerly, token
ids, token types and positions are also checked against their tables (JAX's gather would clamp
them silently; PyTorch raises an index error). Under ``jax.jit`` only the shape and dtype checks
run, and the compiled computation is exactly the unchecked one.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altjax.models import inputs
from altjax.models.align import AlignConfig, AlignModel
from altjax.models.altclip import AltCLIPConfig, AltCLIPModel
from altjax.models.bert import BertConfig
from altjax.models.clip import CLIPConfig, CLIPModel
from altjax.models.clip_text import CLIPTextConfig
from altjax.models.efficientnet import EfficientNetConfig
from altjax.models.vit import CLIPVisionConfig
from altjax.models.xlm_roberta import XLMRobertaConfig
from helpers import bert_vocab_dir

TOWER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
VIT = CLIPVisionConfig(**TOWER, image_size=16, patch_size=8)
BATCH, LENGTH = 2, 6


@functools.cache
def build(family: str):
    if family == "align":
        vision = EfficientNetConfig(
            image_size=16, width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=(3,), in_channels=(32,),
            out_channels=(16,), strides=(1,), num_block_repeats=(1,), expand_ratios=(1,), hidden_dim=16,
        )
        text = BertConfig(**TOWER, vocab_size=99, max_position_embeddings=12, type_vocab_size=2)
        return AlignModel(AlignConfig(text_config=text, vision_config=vision, projection_dim=16))
    if family == "altclip":
        text = XLMRobertaConfig(**TOWER, vocab_size=99, max_position_embeddings=12, project_dim=24)
        return AltCLIPModel(AltCLIPConfig(text_config=text, vision_config=VIT, projection_dim=16))
    text = CLIPTextConfig(**TOWER, vocab_size=99, max_position_embeddings=12, bos_token_id=97, eos_token_id=98,
                          pad_token_id=98)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=VIT, projection_dim=16))


FAMILY_MODEL = {"align": "AlignModel", "altclip": "AltCLIPModel", "clip": "CLIPModel"}


def pixels(family, batch=BATCH, layout="nhwc", dtype=np.float32):
    x = np.random.default_rng(0).normal(size=(batch, 16, 16, 3)).astype(dtype)
    return np.transpose(x, (0, 3, 1, 2)) if layout == "nchw" else x


def token_ids(family, batch=BATCH, length=LENGTH, seed=1):
    # Ids 3..96 (no pad, bos or eos of any family), then XLM-R/BERT-like framing.
    ids = np.random.default_rng(seed).integers(3, 97, size=(batch, length))
    if family == "clip":
        ids[:, 0], ids[:, -1] = 97, 98
    else:
        ids[:, 0], ids[:, -1] = 0, 2
    return ids


# --- entry points ---------------------------------------------------------------------------------
# (family, name in the error, how to call it). Text entry points take the text keywords; image
# entry points take pixel_values. Dual-encoder __call__ gets valid values for the other side.

def _text_entry(family, which):
    model = build(family)
    px = pixels(family)
    if which == "call":
        return FAMILY_MODEL[family], lambda **kw: model(pixel_values=px, **kw)
    if which == "features":
        return FAMILY_MODEL[family], model.get_text_features
    if which == "tower":
        return type(model.text_model).__name__, model.text_model
    if which == "roberta":
        return "XLMRoberta", model.text_model.roberta
    teacher = model.text_teacher()
    return "CLIPTextTeacher", teacher if which == "teacher" else teacher.get_text_features


TEXT_ENTRIES = [
    ("align", "call"), ("align", "features"), ("align", "tower"),
    ("altclip", "call"), ("altclip", "features"), ("altclip", "tower"), ("altclip", "roberta"),
    ("clip", "call"), ("clip", "features"), ("clip", "tower"), ("clip", "teacher"), ("clip", "teacher-features"),
]
TYPED = {"align", "altclip"}  # families whose text towers take token_type_ids


def _image_entry(family, which):
    model = build(family)
    ids = token_ids(family)
    if which == "call":
        return FAMILY_MODEL[family], lambda pixel_values, **kw: model(input_ids=ids, pixel_values=pixel_values, **kw)
    if which == "features":
        return FAMILY_MODEL[family], model.get_image_features
    return type(model.vision_model).__name__, model.vision_model


IMAGE_ENTRIES = [(f, w) for f in ("align", "altclip", "clip") for w in ("call", "features", "tower")]


def entry_id(entry):
    return "-".join(entry)


def raises(model, message):
    return pytest.raises(ValueError, match=re.escape(f"{model}: ") + message)


# --- text arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", TEXT_ENTRIES, ids=entry_id)
def test_token_ids_outside_the_vocabulary(entry):
    family, which = entry
    name, fn = _text_entry(family, which)
    ids = token_ids(family)
    fn(input_ids=ids, attention_mask=np.ones_like(ids))  # valid: no error
    bad = ids.copy()
    bad[1, 3] = 99
    with raises(name, r"input_ids holds token id 99 at \[1, 3\] but the text vocabulary has 99 ids \(0\.\.98\); "
                      r"were these ids made by another model's tokenizer\?"):
        fn(input_ids=bad)
    bad = ids.copy()
    bad[0, 2] = -1
    with raises(name, r"input_ids holds token id -1 at \[0, 2\] but token ids must lie in 0\.\.98"):
        fn(input_ids=bad)
    # The same from a jax array on the device, not only from NumPy.
    with raises(name, r"input_ids holds token id -1 at \[0, 2\]"):
        fn(input_ids=jnp.asarray(bad))


@pytest.mark.parametrize("entry", TEXT_ENTRIES, ids=entry_id)
def test_input_ids_rank_and_dtype(entry):
    family, which = entry
    name, fn = _text_entry(family, which)
    ids = token_ids(family)
    fn(input_ids=ids.astype(np.int32))
    with raises(name, r"input_ids must be a 2-D array \(batch, sequence_length\), got shape \(6,\); add the batch"):
        fn(input_ids=ids[0])
    with raises(name, r"input_ids must be a 2-D array \(batch, sequence_length\), got shape \(1, 2, 6\)"):
        fn(input_ids=ids[None])
    with raises(name, r"input_ids must hold integer token ids, got dtype float32"):
        fn(input_ids=ids.astype(np.float32))
    with raises(name, r"input_ids must hold integer token ids, got dtype bool"):
        fn(input_ids=ids > 50)
    with raises(name, r"input_ids has no tokens \(shape \(2, 0\)\)"):
        fn(input_ids=ids[:, :0])


@pytest.mark.parametrize("entry", TEXT_ENTRIES, ids=entry_id)
def test_attention_mask_shape_and_dtype(entry):
    family, which = entry
    name, fn = _text_entry(family, which)
    ids = token_ids(family)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    fn(input_ids=ids, attention_mask=mask.astype(bool))  # boolean masks are accepted
    with raises(name, r"attention_mask has shape \(2, 5\) but input_ids has shape \(2, 6\); they must match"):
        fn(input_ids=ids, attention_mask=mask[:, :5])
    with raises(name, r"attention_mask has shape \(6,\) but input_ids has shape \(2, 6\)"):
        fn(input_ids=ids, attention_mask=mask[0])
    with raises(name, r"attention_mask has shape \(1, 6\) but input_ids has shape \(2, 6\)"):
        fn(input_ids=ids, attention_mask=mask[:1])
    with raises(name, r"attention_mask must be integer or boolean \(1 = attend, 0 = padding\), got dtype float32"):
        fn(input_ids=ids, attention_mask=mask.astype(np.float32))


@pytest.mark.parametrize("entry", TEXT_ENTRIES, ids=entry_id)
def test_position_ids(entry):
    family, which = entry
    name, fn = _text_entry(family, which)
    ids = token_ids(family)
    positions = np.arange(LENGTH)[None] + 2
    fn(input_ids=ids, position_ids=positions)  # (1, L) broadcasts over the batch, as in the reference
    fn(input_ids=ids, position_ids=np.repeat(positions, BATCH, 0))
    with raises(name, r"position_ids must be a 2-D array \(batch, sequence_length\), got shape \(6,\)"):
        fn(input_ids=ids, position_ids=positions[0])
    with raises(name, r"position_ids has shape \(1, 5\) but input_ids has shape \(2, 6\); position_ids must be "
                      r"\(2, 6\) or \(1, 6\)"):
        fn(input_ids=ids, position_ids=positions[:, :5])
    with raises(name, r"position_ids must hold integer position ids, got dtype float64"):
        fn(input_ids=ids, position_ids=positions.astype(np.float64))
    bad = np.repeat(positions, BATCH, 0)
    bad[1, 5] = 12
    with raises(name, r"position_ids holds 12 at \[1, 5\] but the model has 12 positions \(0\.\.11, "
                      r"max_position_embeddings\)"):
        fn(input_ids=ids, position_ids=bad)
    bad[1, 5] = -3
    with raises(name, r"position_ids holds -3 at \[1, 5\]"):
        fn(input_ids=ids, position_ids=bad)


@pytest.mark.parametrize("entry", [e for e in TEXT_ENTRIES if e[0] in TYPED], ids=entry_id)
def test_token_type_ids(entry):
    family, which = entry
    name, fn = _text_entry(family, which)
    ids = token_ids(family)
    types = np.zeros_like(ids)
    fn(input_ids=ids, token_type_ids=types)
    with raises(name, r"token_type_ids must be a 2-D array \(batch, sequence_length\), got shape \(2, 6, 1\)"):
        fn(input_ids=ids, token_type_ids=types[..., None])
    with raises(name, r"token_type_ids has shape \(2, 3\) but input_ids has shape \(2, 6\)"):
        fn(input_ids=ids, token_type_ids=types[:, :3])
    with raises(name, r"token_type_ids must hold integer token type ids, got dtype float32"):
        fn(input_ids=ids, token_type_ids=types.astype(np.float32))
    n = build(family).config.text_config.type_vocab_size
    types[0, 1] = n
    with raises(name, rf"token_type_ids holds {n} at \[0, 1\] but the model has {n} token types? "
                      rf"\(0\.\.{n - 1}, type_vocab_size\)"):
        fn(input_ids=ids, token_type_ids=types)


@pytest.mark.parametrize("entry", TEXT_ENTRIES, ids=entry_id)
def test_sequences_beyond_max_position_embeddings(entry):
    family, which = entry
    name, fn = _text_entry(family, which)
    if family == "altclip":
        # XLM-R counts positions over the non-pad tokens from pad_token_id + 1: 12 - 1 - 1 = 10 fit.
        fn(input_ids=token_ids(family, length=10))
        padded = np.concatenate([token_ids(family, length=10), np.ones((BATCH, 4), np.int64)], axis=1)
        fn(input_ids=padded)  # longer than 10, but only 10 tokens that are not padding: fine (as the reference)
        with raises(name, r"input_ids row 0 has 11 tokens that are not padding \(pad_token_id 1\), but with "
                          r"max_position_embeddings 12 at most 10 fit"):
            fn(input_ids=token_ids(family, length=11))
    else:
        fn(input_ids=token_ids(family, length=12))
        with raises(name, r"input_ids has sequence length 13 but max_position_embeddings is 12; truncate"):
            fn(input_ids=token_ids(family, length=13))


def test_missing_input_ids_are_named():
    for family in ("align", "altclip", "clip"):
        model = build(family)
        with raises(FAMILY_MODEL[family], r"input_ids is required"):
            model.get_text_features(None)
        with pytest.raises(ValueError, match=rf"{FAMILY_MODEL[family]} needs both input_ids and pixel_values "
                                             r"\(input_ids not given\)"):
            model(pixel_values=pixels(family))


# --- pixel_values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", IMAGE_ENTRIES, ids=entry_id)
def test_pixel_values_rank_channels_and_dtype(entry):
    family, which = entry
    name, fn = _image_entry(family, which)
    px = pixels(family)
    fn(pixel_values=px)
    fn(pixel_values=px.astype(jnp.bfloat16))  # any floating dtype
    layouts = r"NHWC \(B, H, W, 3\)" + (r" or NCHW \(B, 3, H, W\)" if which != "tower" else "")
    with raises(name, rf"pixel_values must be a 4-D batch of images, {layouts}; got shape \(16, 16, 3\); add the"):
        fn(pixel_values=px[0])
    with raises(name, rf"pixel_values must be a 4-D batch of images, {layouts}; got shape \(1, 2, 16, 16, 3\)"):
        fn(pixel_values=px[None])
    four = np.concatenate([px, px[..., :1]], axis=-1)
    with raises(name, rf"pixel_values has shape \(2, 16, 16, 4\) but the model takes 3-channel images, {layouts}"):
        fn(pixel_values=four)
    with raises(name, r"pixel_values must be floating point \(the image processor's normalised output\), got "
                      r"dtype uint8"):
        fn(pixel_values=(px * 50 + 128).clip(0, 255).astype(np.uint8))
    with raises(name, r"pixel_values must be floating point .* got dtype int32"):
        fn(pixel_values=px.astype(np.int32))


@pytest.mark.parametrize("entry", IMAGE_ENTRIES, ids=entry_id)
def test_nchw_is_accepted_by_the_dual_encoders_only(entry):
    family, which = entry
    name, fn = _image_entry(family, which)
    nchw = pixels(family, layout="nchw")
    if which == "tower":
        with raises(name, r"pixel_values has shape \(2, 3, 16, 16\) but the model takes 3-channel images, "
                          r"NHWC \(B, H, W, 3\); this looks like NCHW"):
            fn(pixel_values=nchw)
    else:
        # The existing rule (layers.to_nhwc): NCHW when the channels are in dim 1 and not last.
        a, b = fn(pixel_values=nchw), fn(pixel_values=pixels(family))
        a, b = (a.logits_per_text, b.logits_per_text) if which == "call" else (a, b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        with raises(name, r"pixel_values has shape \(2, 4, 16, 16\) but the model takes 3-channel images"):
            fn(pixel_values=np.zeros((2, 4, 16, 16), np.float32))


@pytest.mark.parametrize("entry", [e for e in IMAGE_ENTRIES if e[0] != "align"], ids=entry_id)
def test_vit_image_size_is_checked_at_the_boundary(entry):
    family, which = entry
    name, fn = _image_entry(family, which)
    small = pixels(family)[:, :8, :8]
    with raises(name, r"pixel_values: Input image size \(8\*8\) doesn't match model \(16\*16\); pass "
                      r"interpolate_pos_encoding=True"):
        fn(pixel_values=small)
    fn(pixel_values=small, interpolate_pos_encoding=True)


def test_return_loss_needs_as_many_texts_as_images():
    for family in ("align", "altclip", "clip"):
        model = build(family)
        ids = token_ids(family, batch=3)
        assert model(input_ids=ids, pixel_values=pixels(family), return_loss=False).logits_per_text.shape == (3, 2)
        with raises(FAMILY_MODEL[family], r"return_loss pairs texts and images by index, but input_ids has 3 rows "
                                          r"and pixel_values 2 images"):
            model(input_ids=ids, pixel_values=pixels(family), return_loss=True)


# --- the example: one model's processor output fed to another -----------------------------

def test_altclip_called_with_align_processor_inputs_raises():
    import transformers

    # ALIGN's processor: BERT token ids (101 = [CLS], 1037 "a", ...), token types, a mask, NCHW pixels.
    tokenizer = transformers.BertTokenizer.from_pretrained(bert_vocab_dir())
    batch = dict(tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=8, return_tensors="np"))
    batch["pixel_values"] = pixels("altclip", layout="nchw")
    model = build("altclip")  # an XLM-R text tower whose vocabulary (99 ids) is smaller than BERT's
    message = (r"AltCLIPModel: input_ids holds token id 101 at \[0, 0\] but the text vocabulary has 99 ids "
               r"\(0\.\.98\); were these ids made by another model's tokenizer\?")
    with pytest.raises(ValueError, match=message):
        model(**batch)
    with pytest.raises(ValueError, match=message):
        model.get_text_features(**{k: v for k, v in batch.items() if k != "pixel_values"})


def test_align_called_with_xlmr_ids_raises():
    # The other way round at full vocabulary size: XLM-R ids (250002-id vocabulary) into BERT's 30522.
    text = BertConfig(**TOWER, vocab_size=30522, max_position_embeddings=12)
    model = AlignModel(AlignConfig(text_config=text, vision_config=build("align").config.vision_config,
                                   projection_dim=16))
    ids = np.array([[0, 6, 3293, 111, 30522, 2], [0, 149007, 5, 2, 1, 1]])
    with raises("AlignModel", r"input_ids holds token id 30522 at \[0, 4\] but the text vocabulary has 30522 ids "
                              r"\(0\.\.30521\)"):
        model.get_text_features(ids)


# --- under jit: static checks only, and nothing added to the computation --------------------------

@pytest.mark.parametrize("family", ["align", "altclip", "clip"])
def test_jit_skips_value_checks_and_keeps_static_ones(family):
    model = build(family)
    name = FAMILY_MODEL[family]
    step = nnx.jit(lambda m, ids, px: m(input_ids=ids, pixel_values=px).logits_per_text)
    ids, px = token_ids(family), pixels(family)
    eager = model(input_ids=ids, pixel_values=px).logits_per_text
    np.testing.assert_allclose(np.asarray(step(model, jnp.asarray(ids), jnp.asarray(px))), np.asarray(eager),
                               rtol=1e-5, atol=1e-5)
    bad = ids.copy()
    bad[0, 1] = 99
    # Eagerly the value check raises ...
    with raises(name, r"input_ids holds token id 99"):
        model(input_ids=bad, pixel_values=px)
    # ... under jit the ids are tracers: no value check, no error at trace time (and no host sync).
    out = step(model, jnp.asarray(bad), jnp.asarray(px))
    assert out.shape == (BATCH, BATCH)
    # Shape and dtype checks cost nothing and still run at trace time.
    with raises(name, r"input_ids must hold integer token ids, got dtype float32"):
        step(model, jnp.asarray(ids, jnp.float32), jnp.asarray(px))
    with raises(name, r"pixel_values must be floating point"):
        step(model, jnp.asarray(ids), jnp.asarray(px, jnp.int32))
    with raises(name, r"input_ids must be a 2-D array"):
        step(model, jnp.asarray(ids[0]), jnp.asarray(px))


def _jaxprs(model, monkeypatch, method, *args):
    graphdef, state = nnx.split(model)

    def trace():
        fn = lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a)  # noqa: E731
        return str(jax.make_jaxpr(fn)(state, *args))

    calls = []
    for check in ("check_text", "check_pixels", "check_pairs"):
        original = getattr(inputs, check)
        monkeypatch.setattr(inputs, check, lambda *a, _o=original, **k: (calls.append(1), _o(*a, **k))[1])
    checked = trace()
    assert calls, f"{method}: the checks did not run at trace time"
    for check in ("check_text", "check_pixels", "check_pairs"):
        monkeypatch.setattr(inputs, check, lambda *a, **k: None)
    return checked, trace()


@pytest.mark.parametrize("family", ["align", "altclip", "clip"])
def test_checks_add_nothing_to_the_jitted_computation(family, monkeypatch):
    model = build(family)
    ids, px = jnp.asarray(token_ids(family)), jnp.asarray(pixels(family))
    mask = jnp.ones_like(ids)
    for method, args in (("get_text_features", (ids, mask)), ("get_image_features", (px,)), ("__call__", (ids, px))):
        with monkeypatch.context() as patch:
            checked, unchecked = _jaxprs(model, patch, method, *args)
        assert checked == unchecked, f"{family} {method}: the checks changed the traced computation"
