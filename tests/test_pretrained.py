"""altjax.model_io.pretrained: HF directories in every weight layout, altjax directories, atomic writes.

Round trips are checked bit for bit against what transformers itself wrote; every bad input must
give a CheckpointError / ConversionError naming the file, key or shape, on one line, and leave no
output behind.
"""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from altjax import sharding
from altjax.model_io import hf_weights
from altjax.model_io import engine
from altjax.model_io.directories import CheckpointError
from altjax.models.align import AlignModel
from altjax.models.altclip import AltCLIPModel
from helpers import assert_round_trip, tiny_hf_dir, torch_state

MODELS = {"align": (AlignModel, transformers.AlignModel), "altclip": (AltCLIPModel, transformers.AltCLIPModel)}


def safetensors_state(directory) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory's safetensors (single or sharded), as transformers wrote it."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    assert files, f"no safetensors in {directory}: {os.listdir(directory)}"
    state = {}
    for f in files:
        state.update(load_file(os.path.join(directory, f)))
    return state


def assert_same_params(model, expected, what):
    params = engine.model_params(model)
    assert set(params) == set(expected), f"{what}: parameter sets differ: {sorted(set(params) ^ set(expected))}"
    for k, v in expected.items():
        assert params[k].dtype == v.dtype, f"{what}: {k} dtype {params[k].dtype} != {v.dtype}"
        np.testing.assert_array_equal(params[k], v, err_msg=f"{what}: {k} differs")


def no_leftovers(parent, what):
    hidden = [f for f in os.listdir(parent) if f.startswith(".")]
    assert not hidden, f"{what}: temporary directories left behind in {parent}: {hidden}"


@pytest.fixture(scope="module", params=list(MODELS))
def hf_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    tm = tiny_hf_dir(directory, request.param)
    return dict(kind=request.param, dir=directory, tm=tm, state=torch_state(tm))


def test_hf_to_altjax_to_hf_is_bit_exact_and_loads_in_transformers(hf_dir, tmp_path):
    cls, tcls = MODELS[hf_dir["kind"]]
    model = cls.from_pretrained(hf_dir["dir"])
    model.save_pretrained(tmp_path / "jax")
    assert os.path.isdir(tmp_path / "jax" / "params"), "altjax dir without orbax params/"
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        assert os.path.isfile(tmp_path / "jax" / name), f"{name} not carried into the altjax dir"
    restored = cls.from_pretrained(tmp_path / "jax")
    assert_same_params(restored, engine.model_params(model), "altjax dir restore")

    restored.save_pretrained(tmp_path / "hf", format="hf")
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(os.listdir(hf_dir["dir"])), "HF dir files differ"
    ours, theirs = safetensors_state(tmp_path / "hf"), safetensors_state(hf_dir["dir"])
    assert_round_trip(ours, theirs)  # same on-disk key spellings, values and dtypes as transformers wrote
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((hf_dir["dir"] / "config.json").read_text())
    tm, info = tcls.from_pretrained(tmp_path / "hf", output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"transformers reports {kind} loading our HF export: {info[kind]}"
    assert_round_trip(torch_state(tm), hf_dir["state"])


def test_sharded_export_and_import(hf_dir, tmp_path):
    cls, tcls = MODELS[hf_dir["kind"]]
    model = cls.from_pretrained(hf_dir["dir"])
    model.save_pretrained(tmp_path / "sharded", format="hf", max_shard_size="60KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files, f"not sharded: {files}"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    sizes = {f: os.path.getsize(tmp_path / "sharded" / f) for f in shards}
    state = safetensors_state(tmp_path / "sharded")
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values()), "index total_size is wrong"
    assert set(index["weight_map"]) == set(state), "index weight_map does not list every tensor"
    # A shard may exceed the limit only by its header, or when it holds a single larger tensor.
    for f in shards:
        keys = [k for k, v in index["weight_map"].items() if v == f]
        assert sizes[f] <= 60_000 + 20_000 or len(keys) == 1, f"{f}: {sizes[f]} bytes with {len(keys)} tensors"
    assert_round_trip(state, safetensors_state(hf_dir["dir"]))
    tm, info = tcls.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"]), f"transformers on our shards: {info}"
    assert_same_params(cls.from_pretrained(tmp_path / "sharded"), engine.model_params(model), "sharded import")


def test_transformers_shards_and_pytorch_bin_load_the_same_weights(hf_dir, tmp_path):
    cls, _ = MODELS[hf_dir["kind"]]
    expected = engine.model_params(cls.from_pretrained(hf_dir["dir"]))
    hf_dir["tm"].save_pretrained(tmp_path / "hf_shards", max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "hf_shards" / "model.safetensors.index.json"), "transformers did not shard"
    assert_same_params(cls.from_pretrained(tmp_path / "hf_shards"), expected, "transformers-sharded safetensors")

    (tmp_path / "bin").mkdir()
    torch.save(hf_dir["tm"].state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((hf_dir["dir"] / "config.json").read_text())
    assert_same_params(cls.from_pretrained(tmp_path / "bin"), expected, "pytorch_model.bin")


def test_load_into_a_mesh_places_each_shard_directly(hf_dir, tmp_path):
    cls, _ = MODELS[hf_dir["kind"]]
    model = cls.from_pretrained(hf_dir["dir"])
    model.save_pretrained(tmp_path / "jax")
    mesh = sharding.make_mesh(data=8)
    head = "text_projection" if hf_dir["kind"] == "align" else "visual_projection"
    rules = ((rf"^{head}/kernel$", P("data", None)), (r".*", P()))
    for source in (hf_dir["dir"], tmp_path / "jax"):
        sharded = cls.from_pretrained(source, mesh=mesh, rules=rules)
        assert_same_params(sharded, engine.model_params(model), f"mesh load from {source.name}")
        kernel = engine.model_variables(sharded)[f"{head}.kernel"].get_value()
        assert kernel.sharding.spec == P("data", None), f"{head}.kernel has sharding {kernel.sharding}"
        rows = kernel.shape[0] // 8
        assert {s.data.shape for s in kernel.addressable_shards} == {(rows, kernel.shape[1])}, \
            f"devices hold {[s.data.shape for s in kernel.addressable_shards]}, expected 1/8 of {kernel.shape} each"
        scalar = "temperature" if hf_dir["kind"] == "align" else "logit_scale"
        replicated = engine.model_variables(sharded)[scalar].get_value()
        assert replicated.sharding.spec == P() and len(replicated.sharding.device_set) == 8, \
            f"{scalar} should be replicated over the 8 devices, has {replicated.sharding}"


def test_bad_directories_name_the_problem_on_one_line(tmp_path):
    def expect(path, pattern):
        with pytest.raises((CheckpointError, engine.ConversionError), match=pattern) as e:
            AlignModel.from_pretrained(path)
        assert "\n" not in str(e.value), f"error is not one line: {e.value}"

    expect(tmp_path / "absent", "not a directory")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", "no config.json")
    good = tmp_path / "good"
    tiny_hf_dir(good, "align")
    config = (good / "config.json").read_text()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    expect(bad, r"config\.json: not valid JSON")
    (bad / "config.json").write_text(json.dumps(dict(json.loads(config), model_type="bert")))
    expect(bad, r"model_type is 'bert', expected 'align'")
    (bad / "config.json").write_text(config)
    expect(bad, r"no weights in the model directory")

    data = (good / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect(bad, r"model\.safetensors: not a readable safetensors file")
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!" + b"\0" * 100)
    expect(bad, r"model\.safetensors: not a readable safetensors file")

    os.remove(bad / "model.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"temperature": "model-00001-of-00002.safetensors"}}))
    expect(bad, r"lists shard files that do not exist: model-00001-of-00002\.safetensors")
    (bad / "model.safetensors.index.json").write_text("[]")
    expect(bad, r"model\.safetensors\.index\.json: not a valid weight index")
    os.remove(bad / "model.safetensors.index.json")

    (bad / "pytorch_model.bin").write_bytes(b"not a zip file")
    expect(bad, r"pytorch_model\.bin: not a readable PyTorch checkpoint")
    os.remove(bad / "pytorch_model.bin")

    weights = load_file(good / "model.safetensors")
    del weights["temperature"]
    weights["vision_model.extra.weight"] = np.zeros(3, np.float32)
    weights["text_projection.bias"] = weights["text_projection.bias"][:-1].copy()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    expect(bad, r"missing keys \(1\): temperature; unexpected keys \(1\): vision_model\.extra\.weight")
    weights["temperature"] = np.array(1.0, np.float32)
    del weights["vision_model.extra.weight"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    expect(bad, r"text_projection\.bias: .*model\.safetensors has \(39,\), the model expects \(40,\)")

    # An altjax directory whose orbax parameters belong to another model.
    AlignModel.from_pretrained(good).save_pretrained(tmp_path / "jax")
    other = json.loads(config)
    other["text_config"]["intermediate_size"] = 41
    (tmp_path / "jax" / "config.json").write_text(json.dumps(other))
    expect(tmp_path / "jax", r"params does not match the model: shape mismatches \(6\): "
                             r"text_model\.encoder\.layer\.0\.intermediate\.dense\.bias: checkpoint has \(37,\), "
                             r"the model expects \(41,\)")
    other["projection_dim"] = 24
    (tmp_path / "jax" / "config.json").write_text(json.dumps(other))
    expect(tmp_path / "jax", r"config\.json: projection_dim 24 must equal the vision tower's output channels 40")


def test_writes_are_atomic_and_refuse_existing_paths(tmp_path, monkeypatch):
    tiny_hf_dir(tmp_path / "hf", "align")
    model = AlignModel.from_pretrained(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="taken: output path exists"):
        model.save_pretrained(tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == [], "an existing output was written into"
    with pytest.raises(CheckpointError, match="parent directory does not exist"):
        model.save_pretrained(tmp_path / "no" / "such" / "dir")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("altjax.model_io.hf_weights.write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out", format="hf")
    assert not os.path.exists(tmp_path / "out"), "a failed save left a partial output directory"
    no_leftovers(tmp_path, "failed HF save")
    monkeypatch.undo()

    model.save_pretrained(tmp_path / "taken", overwrite=True)
    assert os.path.isdir(tmp_path / "taken" / "params"), "overwrite did not replace the directory"
    no_leftovers(tmp_path, "overwrite")


def test_parse_size():
    assert hf_weights.parse_size("50GB") == 50 * 10**9
    assert hf_weights.parse_size("2GiB") == 2 * 2**30
    assert hf_weights.parse_size("500kb") == 500_000
    assert hf_weights.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size '5 parsecs'"):
        hf_weights.parse_size("5 parsecs")


def test_bf16_pytorch_bin_reads_as_bfloat16(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    weights = hf_weights.TorchBinFile(tmp_path / "pytorch_model.bin")
    w = weights["w"]
    assert str(w.dtype) == "bfloat16" and weights.shape("w") == (2, 3), f"read {w.dtype} {w.shape}"
    np.testing.assert_array_equal(w.astype(np.float32), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert jax.numpy.asarray(w).dtype == jax.numpy.bfloat16
