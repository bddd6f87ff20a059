"""altjax.model_io.safetensors_io against the safetensors package: same tensors both ways, clear errors."""
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as torch_load_file

from altjax.model_io.safetensors_io import SafetensorsError, SafetensorsReader, write_safetensors


def tensors():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "f16": rng.normal(size=(7,)).astype(np.float16),
        "f64 scalar": np.array(2.5),
        "i64": np.arange(12, dtype=np.int64).reshape(2, 2, 3),
        "i32": np.array([-1, 2], np.int32),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_reads_what_the_reference_writes(tmp_path):
    save_file(tensors(), tmp_path / "ref.safetensors", metadata={"format": "pt"})
    reader = SafetensorsReader(tmp_path / "ref.safetensors")
    assert set(reader) == set(tensors()) and reader.metadata == {"format": "pt"}
    for k, v in tensors().items():
        got = reader[k]
        assert got.dtype == v.dtype and got.shape == v.shape == reader.shape(k), f"{k}: {got.dtype} {got.shape}"
        np.testing.assert_array_equal(got, v, err_msg=k)


def test_the_reference_reads_what_we_write(tmp_path):
    nbytes = write_safetensors(tmp_path / "ours.safetensors", tensors(), metadata={"format": "pt"})
    assert nbytes == (tmp_path / "ours.safetensors").stat().st_size
    back = load_file(tmp_path / "ours.safetensors")
    for k, v in tensors().items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bfloat16_both_ways(tmp_path):
    t = torch.linspace(-3, 3, 10).to(torch.bfloat16).reshape(2, 5)
    from safetensors.torch import save_file as torch_save_file

    torch_save_file({"w": t}, tmp_path / "bf16.safetensors")
    w = SafetensorsReader(tmp_path / "bf16.safetensors")["w"]
    assert w.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(w.astype(np.float32), t.float().numpy())
    write_safetensors(tmp_path / "back.safetensors", {"w": w})
    assert torch.equal(torch_load_file(tmp_path / "back.safetensors")["w"], t), "bf16 changed writing it back"


def test_damaged_files_are_named_with_the_problem(tmp_path):
    save_file(tensors(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    cases = {
        "short": (data[:5], "too short for a safetensors header"),
        "truncated": (data[:-10], "truncated: "),
        "huge-header": ((10**12).to_bytes(8, "little") + data[8:], "does not fit the file"),
        "not-json": ((4).to_bytes(8, "little") + b"{{{{" + b"\0" * 64, "header is not valid JSON"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SafetensorsError, match=message) as e:
            SafetensorsReader(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), f"{name}: the error does not name the file: {e.value}"
