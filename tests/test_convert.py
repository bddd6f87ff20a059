"""altjax-convert (convert/cli.py): both directions with --check, real weights, and every bad input.

Expected errors must be one line on stderr starting with "altjax-convert: error:", exit status 2,
no traceback and nothing written (no output, no temporary directory left beside it). A parity
failure exits 1 and writes nothing either.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file, save_file

import skimage.data
from altjax.model_io import engine, parity
from altjax.models import registry
from altjax_convert.cli import EXIT_CODES, main
from helpers import bert_vocab_dir, tiny_hf_dir, transformers_saved_dir, write_processor_files

import test_align


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_rejected(capsys, out_dir, *argv, match):
    code, out, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("altjax-convert")]
    assert code == 2, f"exit status {code} (expected 2) for {argv}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("altjax-convert: error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err, f"traceback printed for an expected error: {err}"
    assert match in lines[0], f"error {lines[0]!r} does not mention {match!r}"
    if not os.path.isdir(out_dir):
        parent = os.path.dirname(out_dir)
        assert not os.path.exists(out_dir), f"{out_dir} was written"
        leftovers = [f for f in os.listdir(parent) if f.startswith(".")]
        assert not leftovers, f"temporary directories left: {leftovers}"


def table_rows(out):
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in parity.OUTPUTS:
            rows[parts[0]] = dict(max_abs=float(parts[2]), max_rel=float(parts[3]), cosine=float(parts[4]),
                                  verdict=" ".join(parts[5:]))
    return rows


@pytest.mark.parametrize("model_type", ["align", "altclip", "clip"])
def test_both_directions_with_check(model_type, tmp_path, capsys):
    tiny_hf_dir(tmp_path / "hf", model_type)
    code, out, err = run(capsys, "to-altjax", tmp_path / "hf", tmp_path / "jax", "--check")
    assert code == 0, f"to-altjax --check failed ({code}): {out}\n{err}"
    rows = table_rows(out)
    assert set(rows) == set(parity.OUTPUTS), f"check table lacks outputs: {out}"
    for name, row in rows.items():
        assert row["verdict"] == "ok" and row["max_rel"] <= 1e-5, f"{model_type} {name}: {row}"
    assert os.path.isdir(tmp_path / "jax" / "params") and "converted in" in err and "loading parameters" in err

    code, out, err = run(capsys, "to-hf", tmp_path / "jax", tmp_path / "back", "--check", "--max-shard-size", "100KB")
    assert code == 0, f"to-hf --check failed ({code}): {out}\n{err}"
    assert all(r["verdict"] == "ok" for r in table_rows(out).values()), out
    ours = {}
    for f in os.listdir(tmp_path / "back"):
        if f.endswith(".safetensors"):
            ours.update(load_file(tmp_path / "back" / f))
    theirs = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(ours) == set(theirs), f"keys differ after HF -> altjax -> HF: {sorted(set(ours) ^ set(theirs))}"
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and np.array_equal(ours[k], v), f"{k} changed in HF -> altjax -> HF"
    assert os.path.isfile(tmp_path / "back" / "model.safetensors.index.json"), "--max-shard-size did not shard"


def test_check_without_processor_files_uses_a_synthetic_batch(tmp_path, capsys):
    """A CLIP directory without tokenizer and image settings is checked on random pixels and token
    ids; its special tokens (pad = end-of-text, the last id) are left out of the random ids."""
    tiny_hf_dir(tmp_path / "hf", "clip")
    for name in os.listdir(tmp_path / "hf"):
        if name not in ("config.json", "model.safetensors"):
            os.remove(tmp_path / "hf" / name)
    code, out, err = run(capsys, "to-altjax", tmp_path / "hf", tmp_path / "jax", "--check")
    assert code == 0, f"{out}\n{err}"
    rows = table_rows(out)
    assert set(rows) == set(parity.OUTPUTS) and all(r["verdict"] == "ok" and r["max_rel"] <= 1e-5 for r in rows.values()), out
    assert "inputs: random token ids and normal noise" in out, f"the synthetic inputs are not named: {out}"


def test_check_on_user_images_and_texts(tmp_path, capsys):
    tiny_hf_dir(tmp_path / "hf", "align")
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    Image.fromarray(skimage.data.coffee()).convert("L").save(tmp_path / "coffee.jpg")
    code, out, err = run(capsys, "to-altjax", tmp_path / "hf", tmp_path / "jax", "--check",
                         "--images", tmp_path / "cat.png", tmp_path / "coffee.jpg",
                         "--texts", "a photo of a cat", "a cup of coffee", "a red bicycle")
    assert code == 0, f"{out}\n{err}"
    rows = table_rows(out)
    assert "2x3" in out and all(r["verdict"] == "ok" for r in rows.values()), out


@pytest.mark.parametrize("model_type", ["align", "altclip"])
def test_check_uses_the_processor_of_a_directory_transformers_5_saved(model_type, tmp_path, capsys):
    """transformers 5 saves the image settings in processor_config.json only: --check takes the
    directory's processor from it, on the user's image and text, and says so."""
    transformers_saved_dir(tmp_path / "hf", model_type, tmp_path)
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    code, out, err = run(capsys, "to-altjax", tmp_path / "hf", tmp_path / "jax", "--check",
                         "--images", tmp_path / "cat.png", "--texts", "a cat")
    assert code == 0, f"exit status {code}\n{out}\n{err}"
    processor = {"align": "AlignProcessor", "altclip": "AltCLIPProcessor"}[model_type]
    line = next((line for line in out.splitlines() if line.startswith("inputs: ")), None)
    assert line is not None and f"1 of your images and 1 of your texts through the directory's {processor}" in line, out
    rows = table_rows(out)
    assert set(rows) == set(parity.OUTPUTS) and all(r["verdict"] == "ok" for r in rows.values()), out
    assert "1x1" in out, f"not one image-text pair: {out}"
    assert "processor_config.json" in os.listdir(tmp_path / "jax"), "the processor settings were not copied along"


def test_a_conversion_that_changes_the_weights_fails_the_check_and_writes_nothing(tmp_path, capsys, monkeypatch):
    tiny_hf_dir(tmp_path / "hf", "align")
    assert run(capsys, "to-altjax", tmp_path / "hf", tmp_path / "jax")[0] == 0
    # A converter bug: the exported linear weights pick up a small error.
    forward, backward = engine.LAYOUTS["linear"]
    monkeypatch.setitem(engine.LAYOUTS, "linear", (forward, lambda a: backward(a) * np.float32(1.001)))
    code, out, err = run(capsys, "to-hf", tmp_path / "jax", tmp_path / "broken", "--check")
    assert code == 1, f"a 0.1% weight error passed the check: {out}\n{err}"
    assert "FAIL" in out and "parity check failed" in err, f"{out}\n{err}"
    assert not os.path.exists(tmp_path / "broken"), "a failed check left its output"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "staging directory left behind"


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    good = tmp_path / "good"
    tiny_hf_dir(good, "align")
    out = tmp_path / "out"
    assert_rejected(capsys, out, "to-altjax", tmp_path / "absent", out, match="absent: not a directory")
    (tmp_path / "empty").mkdir()
    assert_rejected(capsys, out, "to-altjax", tmp_path / "empty", out, match="no config.json")

    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((good / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    assert_rejected(capsys, out, "to-altjax", bad, out, match="model_type is 'bert', expected 'align' or 'altclip' or 'clip'")

    # model_type says AltCLIP, the weights are ALIGN's: every key is named as missing or unexpected.
    altclip = tmp_path / "altclip"
    tiny_hf_dir(altclip, "altclip")
    (bad / "config.json").write_text((altclip / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    assert_rejected(capsys, out, "to-altjax", bad, out, match="does not match the model: missing keys (")

    weights = load_file(good / "model.safetensors")
    weights["text_projection.weight"] = weights["text_projection.weight"][:, :-1].copy()
    del weights["temperature"]
    weights["surplus"] = np.zeros(1, np.float32)
    (bad / "config.json").write_text((good / "config.json").read_text())
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    assert_rejected(capsys, out, "to-altjax", bad, out, match="missing keys (1): temperature; unexpected keys (1): surplus")
    weights["temperature"] = np.array(1.0, np.float32)
    del weights["surplus"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    assert_rejected(capsys, out, "to-altjax", bad, out, match="text_projection.weight: ")

    data = (good / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    assert_rejected(capsys, out, "to-altjax", bad, out, match="model.safetensors: not a readable safetensors file")
    (bad / "model.safetensors").write_bytes(os.urandom(4096))
    assert_rejected(capsys, out, "to-altjax", bad, out, match="model.safetensors: not a readable safetensors file")

    (out).mkdir()
    assert_rejected(capsys, out, "to-altjax", good, out, match="output path exists")
    assert os.listdir(out) == [], "an existing output was written into"
    assert_rejected(capsys, tmp_path / "o2", "to-altjax", good, tmp_path / "o2", "--texts", "x", match="only apply with --check")
    assert_rejected(capsys, tmp_path / "o3", "to-altjax", good, tmp_path / "o3", "--check", "--images", tmp_path / "none.png",
                    match="none.png: cannot read the image")


def test_real_minilm_text_tower_in_an_align_checkpoint(tmp_path, capsys):
    """ALIGN whose text tower holds the real all-MiniLM-L6-v2 weights (384 wide) and the real
    bert-base-uncased vocab: converted and checked on real sentences against transformers."""
    minilm = json.loads(open(os.path.join(bert_vocab_dir(), "config.json")).read())
    text_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
    tiny = test_align.hf_config("tiny-a-33px")
    config = transformers.AlignConfig(text_config=transformers.AlignTextConfig(**{k: minilm[k] for k in text_keys}).to_dict(),
                                      vision_config=tiny.vision_config.to_dict(), projection_dim=tiny.projection_dim)
    torch.manual_seed(0)
    tm = transformers.AlignModel(config).eval()
    real = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(bert_vocab_dir(), "model.safetensors")).items()}
    result = tm.text_model.load_state_dict(real, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {"embeddings.position_ids"}, result
    tm.save_pretrained(tmp_path / "hf")
    write_processor_files(tmp_path / "hf", "align", config.vision_config.image_size)
    sentences = ["A photo of a cat sleeping on a red sofa.", "Two dogs run along the beach at sunset!",
                 "The Eiffel Tower was completed in 1889."]
    code, out, err = run(capsys, "to-altjax", tmp_path / "hf", tmp_path / "jax", "--check", "--texts", *sentences)
    assert code == 0, f"{out}\n{err}"
    rows = table_rows(out)
    assert rows["text_embeds"]["max_abs"] <= 1e-5, f"real MiniLM text embeddings differ: {rows['text_embeds']}"
    print(f"\nALIGN with real MiniLM text tower:\n{out}")


def test_console_script_and_module_entry_points(tmp_path):
    for cmd in (["altjax-convert"], [sys.executable, "-m", "altjax_convert"]):
        exe = os.path.join(os.path.dirname(sys.executable), "altjax-convert") if cmd == ["altjax-convert"] else None
        argv = ([exe] if exe else cmd) + ["to-hf", str(tmp_path / "missing"), str(tmp_path / "out")]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, f"{argv}: exit {proc.returncode}; stderr {proc.stderr}"
        assert proc.stderr.strip().splitlines()[-1].startswith("altjax-convert: error: ") and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv", [[], ["to-altjax"], ["to-hf"]], ids=["main", "to-altjax", "to-hf"])
def test_help_names_every_model_and_exit_status(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0, f"--help exit status {exit_info.value.code}"
    wanted = [*registry.MODELS, *(f"{code} {words.split()[0]}" for code, words in EXIT_CODES.items())]
    missing = [word for word in wanted if word not in text]
    assert not missing, f"altjax-convert {' '.join(argv)} --help lacks {missing}:\n{text}"
