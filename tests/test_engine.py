"""The conversion engine on a hand-written table: layouts, aliases, and the errors it raises."""
import numpy as np
import pytest

from altjax.model_io.engine import ConversionError, Row, Table, nnx_to_torch, torch_to_nnx

TABLE = Table(
    rows=(
        Row("enc.layers.0.dense.weight", "enc.layers.0.dense.kernel", "linear"),
        Row("enc.layers.0.LayerNorm.weight", "enc.layers.0.norm.scale"),
        Row("stem.weight", "stem.kernel", "conv"),
        Row("bn.num_batches_tracked", "bn.num_batches_tracked", "counter"),
    ),
    aliases=((r"enc\.layer\.(\d+)", r"enc.layers.\1"),),
    ignore=(r"position_ids$",),
    disk_renames=((r"layers\.", "layer."),),
)
SHAPES = {"bn.num_batches_tracked": (), "enc.layers.0.dense.kernel": (3, 2), "enc.layers.0.norm.scale": (3,), "stem.kernel": (5, 5, 3, 4)}


def _state(rng):
    return {
        "enc.layers.0.dense.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "enc.layers.0.LayerNorm.weight": rng.normal(size=(3,)).astype(np.float32),
        "stem.weight": rng.normal(size=(4, 3, 5, 5)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def test_layouts_and_round_trip_are_exact():
    state = _state(np.random.default_rng(0))
    params = torch_to_nnx(state, TABLE, SHAPES)
    np.testing.assert_array_equal(params["enc.layers.0.dense.kernel"], state["enc.layers.0.dense.weight"].T)
    np.testing.assert_array_equal(params["stem.kernel"][1, 2, :, 3], state["stem.weight"][3, :, 1, 2])
    back = nnx_to_torch(params, TABLE, on_disk=False)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype, f"{k}: dtype {back[k].dtype} != {state[k].dtype}"
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    assert params["bn.num_batches_tracked"].dtype == np.int32, "the counter is int32 on the JAX side"
    assert "enc.layer.0.dense.weight" in nnx_to_torch(params, TABLE, on_disk=True)


def test_aliases_legacy_names_and_ignored_buffers_are_accepted():
    state = _state(np.random.default_rng(1))
    state["enc.layer.0.dense.weight"] = state.pop("enc.layers.0.dense.weight")
    state["enc.layers.0.LayerNorm.gamma"] = state.pop("enc.layers.0.LayerNorm.weight")
    state["embeddings.position_ids"] = np.arange(4)
    params = torch_to_nnx(state, TABLE, SHAPES)
    np.testing.assert_array_equal(params["enc.layers.0.norm.scale"], state["enc.layers.0.LayerNorm.gamma"])


def test_every_problem_is_named_at_once():
    state = _state(np.random.default_rng(2))
    del state["stem.weight"]
    state["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as e:
        torch_to_nnx(state, TABLE, SHAPES, source="ckpt.safetensors")
    msg = str(e.value)
    assert "missing keys (1)" in msg and "stem.weight" in msg, msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg, msg
    assert "\n" not in msg, f"the error should be one line: {msg!r}"


def test_shape_mismatch_names_key_and_both_shapes_in_torch_layout():
    state = _state(np.random.default_rng(3))
    state["enc.layers.0.dense.weight"] = np.zeros((2, 4), np.float32)
    with pytest.raises(ConversionError, match=r"enc\.layers\.0\.dense\.weight: ckpt has \(2, 4\), the model expects \(2, 3\)"):
        torch_to_nnx(state, TABLE, SHAPES, source="ckpt")


def test_duplicate_spellings_are_an_error():
    state = _state(np.random.default_rng(4))
    state["enc.layer.0.dense.weight"] = state["enc.layers.0.dense.weight"]
    with pytest.raises(ConversionError, match="keys given twice"):
        torch_to_nnx(state, TABLE, SHAPES)


def test_scalars_keep_their_shape_both_ways():
    table = Table(rows=(Row("logit_scale", "logit_scale"),))
    params = torch_to_nnx({"logit_scale": np.array(2.5, np.float32)}, table, {"logit_scale": ()})
    assert params["logit_scale"].shape == (), f"scalar came back with shape {params['logit_scale'].shape}"
    assert nnx_to_torch(params, table)["logit_scale"].shape == ()


def test_a_missing_counter_starts_at_zero_like_transformers():
    state = _state(np.random.default_rng(5))
    del state["bn.num_batches_tracked"]
    params = torch_to_nnx(state, TABLE, SHAPES)
    assert params["bn.num_batches_tracked"] == 0 and params["bn.num_batches_tracked"].dtype == np.int32


class _CountingReader(dict):
    """A checkpoint reader that answers shapes from a header and counts tensor reads."""

    reads = 0

    def shape(self, key):
        return np.shape(dict.__getitem__(self, key))

    def __getitem__(self, key):
        type(self).reads += 1
        return dict.__getitem__(self, key)


def test_conversion_checks_shapes_from_headers_and_reads_each_tensor_only_when_asked():
    reader = _CountingReader(_state(np.random.default_rng(6)))
    params = torch_to_nnx(reader, TABLE, SHAPES, lazy=True)
    assert _CountingReader.reads == 0, f"{_CountingReader.reads} tensors read before any was asked for"
    params["stem.kernel"]
    assert _CountingReader.reads == 1, f"reading one parameter read {_CountingReader.reads} tensors"
    bad = _CountingReader(_state(np.random.default_rng(6)))
    dict.__setitem__(bad, "stem.weight", np.zeros((4, 3, 5, 4), np.float32))
    with pytest.raises(ConversionError, match=r"stem\.weight: checkpoint has \(4, 3, 5, 4\), the model expects \(4, 3, 5, 5\)"):
        torch_to_nnx(bad, TABLE, SHAPES, lazy=True)
    assert isinstance(torch_to_nnx(reader, TABLE, SHAPES), dict), "the default result should be a plain dict"
