"""Hugging Face Hub ids (altjax.hub) wherever altjax takes a model directory, offline.

Each test builds a Hugging Face cache of its own (the layout ``huggingface_hub`` reads: blobs named
by their hash, a snapshot of links per commit, refs naming commits) holding tiny random-weight
models, and reads it with ``HF_HUB_OFFLINE=1``: altjax's models and processors from an id must
equal transformers' from the same cache, and an id that is not cached must give one clear line.
"""
import json
import os
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from flax import nnx
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError

import skimage.data
from altjax import hub
from altjax.model_io.directories import CheckpointError
from altjax.models.align import AlignModel
from altjax.model_io import directories
from altjax.models.altclip import AltCLIPConfig, AltCLIPModel
from altjax.models.xlm_roberta import XLMRobertaConfig
from altjax.processing import AlignProcessor, AltCLIPProcessor
from altjax.evaluation.cli import embed_main, load_checkpoint
from altjax.training import checks
from altjax.training.tasks import altclip as altclip_task
from altjax_convert.cli import main
from helpers import assert_close, cache_repo, tiny_hf_dir, torch_inputs

MAIN = "a" * 40
OTHER = "b" * 40


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hub cache, set as the default one, with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read HF_HUB_CACHE when it was imported; the default is taken from here.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def images_and_texts():
    images = [skimage.data.chelsea(), skimage.data.coffee()[:300, :200]]
    return images, ["a photo of a cat", "a cup of coffee", "un chat"]


def compare_with_transformers(model, processor, hf_model, hf_processor, what):
    """altjax's processor and model against transformers', both read from the Hub cache."""
    images, texts = images_and_texts()
    ours = processor(text=texts, images=images, padding=True, return_tensors="np")
    ref = hf_processor(text=texts, images=images, padding=True, return_tensors="np")
    assert set(ours) == set(ref), f"{what}: processor outputs {sorted(ours)} != transformers' {sorted(ref)}"
    for key in ref:
        expected = np.transpose(ref[key], (0, 2, 3, 1)) if key == "pixel_values" else ref[key]
        assert ours[key].shape == expected.shape, f"{what}: {key} shape {ours[key].shape} != {expected.shape}"
        diff = float(np.max(np.abs(ours[key].astype(np.float64) - expected.astype(np.float64))))
        assert diff == 0, f"{what}: {key} differs from transformers' by up to {diff:.3e}"
    text = {k: v for k, v in ours.items() if k != "pixel_values"}
    with torch.no_grad():
        hf_out = hf_model(**torch_inputs(text, ours["pixel_values"]))
    model.eval()
    out = model(**ours)
    return assert_close(out.logits_per_image, hf_out.logits_per_image, atol=1e-5, what=f"{what} logits_per_image")


def test_align_from_a_hub_id_equals_transformers(offline, tmp_path):
    tiny_hf_dir(tmp_path / "align", "align")
    cache_repo(offline, "org/tiny-align", tmp_path / "align", MAIN)
    model, processor = AlignModel.from_pretrained("org/tiny-align"), AlignProcessor.from_pretrained("org/tiny-align")
    assert model.name_or_path == str(offline / "models--org--tiny-align" / "snapshots" / MAIN), model.name_or_path
    hf_model = transformers.AlignModel.from_pretrained("org/tiny-align", local_files_only=True).eval()
    hf_processor = transformers.AlignProcessor.from_pretrained("org/tiny-align", local_files_only=True)
    assert hf_processor.image_processor.crop_size["height"] == model.config.vision_config.image_size
    assert processor.image_config.crop_size == {"height": model.config.vision_config.image_size,
                                                "width": model.config.vision_config.image_size}, \
        f"the repo's image settings were not read: {processor.image_config}"
    diff = compare_with_transformers(model, processor, hf_model, hf_processor, "align from org/tiny-align")
    print(f"align from a Hub id: logits max abs diff {diff:.3e}")


def test_altclip_from_a_hub_id_in_an_explicit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "elsewhere"
    tiny_hf_dir(tmp_path / "altclip", "altclip")
    cache_repo(cache, "org/tiny-altclip", tmp_path / "altclip", MAIN)
    model = AltCLIPModel.from_pretrained("org/tiny-altclip", cache_dir=cache)
    processor = AltCLIPProcessor.from_pretrained("org/tiny-altclip", cache_dir=cache)
    hf_model = transformers.AltCLIPModel.from_pretrained("org/tiny-altclip", cache_dir=cache,
                                                         local_files_only=True).eval()
    hf_processor = transformers.AltCLIPProcessor.from_pretrained("org/tiny-altclip", cache_dir=cache,
                                                                 local_files_only=True)
    diff = compare_with_transformers(model, processor, hf_model, hf_processor, "altclip from org/tiny-altclip")
    print(f"altclip from a Hub id: logits max abs diff {diff:.3e}")


def test_revision_selects_the_commit(offline, tmp_path):
    tiny_hf_dir(tmp_path / "v1", "align", seed=0)
    tiny_hf_dir(tmp_path / "v2", "align", seed=1)
    cache_repo(offline, "org/tiny-align", tmp_path / "v1", MAIN)
    cache_repo(offline, "org/tiny-align", tmp_path / "v2", OTHER, refs=("v2",))
    name = "text_projection.kernel"
    weights = {}
    for revision in (None, "v2", OTHER):
        model = AlignModel.from_pretrained("org/tiny-align", revision=revision)
        weights[revision] = np.asarray(model.text_projection.kernel.get_value())
    assert np.array_equal(weights["v2"], weights[OTHER]), f"revision 'v2' and its commit give different {name}"
    diff = float(np.max(np.abs(weights[None] - weights["v2"])))
    assert diff > 0, f"revision 'v2' loaded the same {name} as main: revision= was not passed through"
    with pytest.raises(CheckpointError, match="revision v3"):
        AlignModel.from_pretrained("org/tiny-align", revision="v3")


def test_an_id_missing_from_the_cache_is_one_clear_error(offline, tmp_path):
    for load in (AlignModel.from_pretrained, AlignProcessor.from_pretrained):
        with pytest.raises(ValueError) as info:
            load("org/not-there")
        message = str(info.value)
        assert "\n" not in message, f"{load.__qualname__}: the error is not one line: {message!r}"
        for part in ("org/not-there", "not in the local Hugging Face cache", str(offline), "HF_HUB_OFFLINE"):
            assert part in message, f"{load.__qualname__}: the error {message!r} does not mention {part!r}"
    with pytest.raises(CheckpointError, match="org/not-there"):
        AlignModel.from_pretrained("org/not-there")
    # Not an id (a relative path with two levels, a dot path): the old error, no Hub lookup.
    for path in ("./no/such/dir", "no/such/dir", str(tmp_path / "missing")):
        with pytest.raises(CheckpointError, match="not a directory"):
            AlignModel.from_pretrained(path)
    assert hub.is_hub_id("kakaobrain/align-base") and not hub.is_hub_id("./x/y") and not hub.is_hub_id("gs://b/m")


def test_convert_cli_reads_a_hub_id_from_the_cache(offline, tmp_path, capsys):
    tiny_hf_dir(tmp_path / "align", "align")
    cache_repo(offline, "org/tiny-align", tmp_path / "align", MAIN)
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    code = main(["to-altjax", "org/tiny-align", str(tmp_path / "jax"), "--check", "--quiet",
                 "--images", str(tmp_path / "cat.png"), "--texts", "a cat"])
    out, err = capsys.readouterr()
    assert code == 0, f"exit status {code}\n{out}\n{err}"
    assert "through the directory's AlignProcessor" in out, f"the inputs used are not named: {out}"
    assert {"preprocessor_config.json", "vocab.txt", "params"} <= set(os.listdir(tmp_path / "jax"))
    reloaded = AlignModel.from_pretrained(tmp_path / "jax")
    assert reloaded.config == AlignModel.from_pretrained("org/tiny-align").config

    code = main(["to-altjax", "org/not-there", str(tmp_path / "jax2")])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("altjax-convert: error: org/not-there"), err
    assert "HF_HUB_OFFLINE" in lines[0] and not os.path.exists(tmp_path / "jax2"), err


def test_training_config_keys_take_hub_ids(offline, tmp_path):
    tiny_hf_dir(tmp_path / "align", "align")
    cache_repo(offline, "org/tiny-align", tmp_path / "align", MAIN)
    c = checks.Checker({"model": {"init_from": "org/tiny-align"}, "data": {"tokenizer": "org/tiny-align"}})
    checks.check_model_dir(c, "model.init_from", "align")
    assert checks.check_tokenizer(c, "data.tokenizer", ("scenes",)) == "org/tiny-align"
    assert not c.problems, c.problems
    tokenizer = checks.pretrained_tokenizer("org/tiny-align", "data.tokenizer")
    assert tokenizer("a cat")["input_ids"] == [101, 1037, 4937, 102], tokenizer("a cat")["input_ids"]

    c = checks.Checker({"model": {"init_from": "org/not-there"}, "data": {"tokenizer": "no/such/../dir"}})
    checks.check_model_dir(c, "model.init_from", "align")
    checks.check_model_dir(c, "model.init_from", "clip")
    checks.check_tokenizer(c, "data.tokenizer", ("scenes",))
    assert len(c.problems) == 3 and "not in the local Hugging Face cache" in c.problems[0], c.problems
    c = checks.Checker({"model": {"init_from": "org/tiny-align"}})
    checks.check_model_dir(c, "model.init_from", "clip")
    assert c.problems and "'align' model" in c.problems[0], c.problems
    with pytest.raises(checks.ConfigError, match="data.tokenizer: org/not-there"):
        checks.pretrained_tokenizer("org/not-there", "data.tokenizer")


def test_online_fetches_only_the_files_altjax_reads(monkeypatch, tmp_path):
    """With the Hub reachable (here: huggingface_hub's listing and download replaced by fakes that
    read a local folder), one kind of weights is fetched, the processor's files only for a
    processor, at the revision asked; an unknown repo and an unreachable Hub are one clear line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    source, cache = tmp_path / "align", tmp_path / "cache"
    tiny_hf_dir(source, "align")
    files = sorted(os.listdir(source))
    listing = files + ["pytorch_model.bin", "README.md", "flax_model.msgpack", "onnx/model.onnx"]
    calls = []

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        calls.append(("list", repo_id, revision))
        if failure is not None:
            raise failure
        return listing

    def snapshot_download(repo_id, *, revision, cache_dir, allow_patterns):
        calls.append(("download", sorted(allow_patterns)))
        snapshot = os.path.join(cache_dir, "models--org--tiny-align", "snapshots", MAIN)
        return snapshot if os.path.isdir(snapshot) else cache_repo(cache_dir, repo_id, source, MAIN, refs=(revision,))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    failure = None
    AlignModel.from_pretrained("org/tiny-align", revision="v1", cache_dir=cache)
    processor = AlignProcessor.from_pretrained("org/tiny-align", revision="v1", cache_dir=cache)
    processor_files = sorted(set(files) - {"config.json", "model.safetensors"})
    expected = [("list", "org/tiny-align", "v1"), ("download", files),  # the model: no .bin, no other files
                ("list", "org/tiny-align", "v1"), ("download", processor_files)]
    assert calls == expected, f"huggingface_hub was asked {calls}, expected {expected}"
    assert processor.image_config.crop_size["height"] < 100, f"not the repo's image settings: {processor.image_config}"

    # What huggingface_hub raises for a 404; the error reads only the response's headers and request.
    response = types.SimpleNamespace(headers={}, request=None, status_code=404)
    failure = RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)
    with pytest.raises(CheckpointError, match=r"^org/typo: no such local directory, and the Hugging Face Hub has no"):
        AlignModel.from_pretrained("org/typo", cache_dir=cache)
    failure = ConnectionError("connection refused")
    model = AlignModel.from_pretrained("org/tiny-align", revision="v1", cache_dir=cache)  # from the cache
    assert model.name_or_path.endswith(MAIN), model.name_or_path
    with pytest.raises(CheckpointError, match=r"could not be reached \(connection refused\)"):
        AlignModel.from_pretrained("org/tiny-align", revision="v2", cache_dir=cache)


def test_altjax_eval_and_embed_load_a_hub_id(offline, tmp_path):
    """``--checkpoint org/name``: the evaluation CLIs' loader takes a Hub id as it is."""
    tiny_hf_dir(tmp_path / "align", "align")
    cache_repo(offline, "org/tiny-align", tmp_path / "align", MAIN)
    model, processor, model_type = load_checkpoint("org/tiny-align")
    assert model_type == "align" and isinstance(model, AlignModel) and isinstance(processor, AlignProcessor)
    assert processor.image_config.crop_size["height"] == model.config.vision_config.image_size, processor.image_config


def test_an_index_built_from_a_hub_id_is_searched_through_it(offline, tmp_path, monkeypatch, capsys):
    """``altjax-embed --checkpoint org/name`` records the id, not a path made of it, so that a later
    ``--index`` search (from another directory) loads the same model."""
    tiny_hf_dir(tmp_path / "align", "align")
    cache_repo(offline, "org/tiny-align", tmp_path / "align", MAIN)
    (tmp_path / "texts.txt").write_text("a photo of a cat\na cup of coffee\n")
    monkeypatch.chdir(tmp_path)
    status = embed_main(["--checkpoint", "org/tiny-align", "--texts", "texts.txt", "--out", "index"])
    assert status == 0, f"embed exit {status}: {capsys.readouterr().err}"
    index = json.loads((tmp_path / "index" / "index.json").read_text())
    assert index["checkpoint"] == "org/tiny-align", f"index records checkpoint {index['checkpoint']!r}"
    monkeypatch.chdir(offline)
    status = embed_main(["--index", str(tmp_path / "index"), "--query", "a cat", "--top-k", "1"])
    captured = capsys.readouterr()
    assert status == 0 and ("a photo of a cat" in captured.out or "a cup of coffee" in captured.out), \
        f"search exit {status}:\n{captured.out}\n{captured.err}"


def test_xlm_roberta_weights_from_a_hub_id(offline, tmp_path):
    """``model.text_init_from`` (AltCLIP phase 1's XLM-R weights) takes a Hub id: the key is
    checked against the cache, and the weights load as from the local directory."""
    transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, type_vocab_size=1)).save_pretrained(tmp_path / "xlmr")
    cache_repo(offline, "org/tiny-xlmr", tmp_path / "xlmr", MAIN)
    c = checks.Checker({"model": {"text_init_from": "org/tiny-xlmr"}})
    c.directory("model.text_init_from", want="config.json", resolve=directories.model_dir)
    assert not c.problems, c.problems

    def student():
        return AltCLIPModel(AltCLIPConfig(
            text_config=XLMRobertaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=24, project_dim=8),
            vision_config=AltCLIPConfig.from_preset("altclip-tiny").vision_config, projection_dim=8),
            rngs=nnx.Rngs(0))

    from_id, from_dir = student(), student()
    altclip_task.load_xlm_roberta(from_id, "org/tiny-xlmr")
    altclip_task.load_xlm_roberta(from_dir, str(tmp_path / "xlmr"))
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(from_id.text_model.roberta, nnx.Param)),
                                 jax.tree_util.tree_leaves_with_path(nnx.state(from_dir.text_model.roberta, nnx.Param))):
        assert_close(a, b, atol=0.0, what=f"text_model.roberta{jax.tree_util.keystr(path)} from the Hub id")
