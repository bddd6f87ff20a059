"""altjax.training.checks: every config mistake is caught before a run starts, each named by its key,
all in one message."""
import os

import pytest

from altjax import train
from altjax.training.checks import ConfigError
from altjax.training.config import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def problems(*overrides):
    config = train.load_config(DEMO, overrides)
    with pytest.raises(ConfigError) as info:
        validate(config)
    return str(info.value)


def test_the_demo_config_is_valid_and_quiet():
    assert validate(train.load_config(DEMO)) == []


@pytest.mark.parametrize("override, key, words", [
    ("batch_size=60", "batch_size", "multiple of the 8 data-parallel devices"),
    ("grad_accum_steps=3", "batch_size", "grad_accum_steps 3 = 24"),
    ("optimizer.name=adam", "optimizer.name", "'adam'"),
    ("optimizer.decay=exponential", "optimizer.decay", "'exponential'"),
    ("loss.kind=sigmod", "loss.kind", "'sigmod'"),
    ("loss.impl=allgather", "loss.impl", "'allgather'"),
    ("task=siglip", "task", "unknown 'siglip'"),
    ("loss.label_smoothing=1.0", "loss.label_smoothing", "[0, 1)"),
    ("total_steps=-5", "total_steps", "at least 1"),
    ("log_every=0", "log_every", "at least 1"),
    ("keep_checkpoints=0", "keep_checkpoints", "at least 1"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate", "finite"),
    ("optimizer.learning_rate=-1.0", "optimizer.learning_rate", "[0, inf]"),
    ("optimizer.b2=1.0", "optimizer.b2", "[0, 1)"),
    ("optimizer.eps=0.0", "optimizer.eps", "(0, inf]"),
    ("remat_policy=nothing_saved", "remat_policy", "jax.checkpoint_policies"),
    ("freeze=^vision_model/(", "freeze", "regular expression"),
    ("mesh={'data': 3, 'model': 1}", "mesh", "does not use the 8 devices"),
    ("model.preset=align-large", "model.preset", "'align-large'"),
    ("model.dtype=float64", "model.dtype", "'float64'"),
    ("model.text={'hidden_sise': 64}", "model.text", "hidden_sise"),
    ("model.vision={'image_size': 0}", "model.vision.image_size", "positive integer"),
    ("data.source=webdatset", "data.source", "'webdatset'"),
    ("data.source=webdataset", "data.files", "empty"),
    ("data.augment=flip", "data.augment", "'flip'"),
    ("data.tokenizer=", "data.tokenizer", "empty"),
    ("data.tokenizer=/no/such/dir", "data.tokenizer", "neither a directory"),
    ("data.lang=fr", "data.lang", "'fr'"),
    ("data.scenes={'image_size': 32, 'num_train': 0}", "data.scenes.num_train", "at least 1"),
    ("eval.datasets=('retrieval/scenes',)", "eval.datasets", "task/dataset/lang"),
    ("eval.datasets=('ranking/scenes/en',)", "eval.datasets", "unknown task"),
    ("eval.datasets=('zeroshot/imagenette/en',)", "eval.datasets", "neither a directory"),
    ("eval.batch_size=0", "eval.batch_size", "at least 1"),
])
def test_each_mistake_is_named_by_its_key(override, key, words):
    message = problems(override)
    assert f"{key}: " in message and words in message, f"--config.{override}: got {message!r}"
    assert "\n" not in message, f"--config.{override}: the message has several lines: {message!r}"


def test_every_problem_is_reported_at_once():
    message = problems("optimizer.name=adam", "loss.kind=sigmod", "total_steps=0")
    for key in ("optimizer.name", "loss.kind", "total_steps"):
        assert f"{key}: " in message, f"{key} missing from {message!r}"


def test_paths_are_checked(tmp_path):
    files = tmp_path / "shard-0.tar"
    files.write_bytes(b"")
    assert validate(train.load_config(DEMO, [
        "data.source=webdataset", f"data.files={tmp_path}/shard-*.tar"])) == []
    message = problems("data.source=webdataset", f"data.files={tmp_path}/other-*.tar")
    assert "data.files: no file matches" in message, message
    (tmp_path / "model").mkdir()
    message = problems(f"model.init_from={tmp_path}/model")
    assert "model.init_from: " in message and "has no config.json" in message, message
    (tmp_path / "model" / "config.json").write_text('{"model_type": "altclip"}')
    message = problems(f"model.init_from={tmp_path}/model")
    assert "holds a 'altclip' model, this run needs 'align'" in message, message


def test_kind_specific_checks():
    config = train.load_config(os.path.join(ROOT, "configs", "altclip_distill.py"),
                               ["data.source=scenes", "data.tokenizer=scenes-xlmr", "batch_size=64"])
    message = str(pytest.raises(ConfigError, validate, config).value)
    assert "distill.teacher: empty" in message, message
    config = train.load_config(os.path.join(ROOT, "configs", "altclip_contrastive.py"),
                               ["data.tokenizer=scenes-xlmr", "data.source=webdataset", "data.files=/x.tar"])
    message = str(pytest.raises(ConfigError, validate, config).value)
    assert "data.caption_keys: empty" in message and "data.files: /x.tar: no such file" in message, message
    config = train.load_config(os.path.join(ROOT, "configs", "altclip_contrastive.py"),
                               ["data.tokenizer=scenes-xlmr", "model.vision={'image_size': 224, 'scan_layers': 'yes'}"])
    message = str(pytest.raises(ConfigError, validate, config).value)
    assert "model.vision.scan_layers: expected true or false, got 'yes'" in message, message


def test_an_unknown_task_is_named_with_the_known_ones():
    config = train.load_config(DEMO)
    config.task = "siglip"
    message = str(pytest.raises(ConfigError, validate, config).value)
    assert "task: unknown 'siglip'; choose one of 'align', 'clip'" in message, message


def test_a_run_that_ends_in_warmup_is_warned_about():
    warnings = validate(train.load_config(DEMO, ["total_steps=10"]))
    assert len(warnings) == 1 and "below optimizer.warmup_steps 50" in warnings[0], warnings


@pytest.mark.parametrize("override, words", [
    ("total_steps=abc", "--config.total_steps=abc: expected an integer, got 'abc'"),
    ("total_steps=1.5", "expected an integer"),
    ("optimizer.learning_rate=fast", "expected a number"),
    ("remat=maybe", "expected true or false"),
    ("total_stepz=5", "no key 'total_stepz' (did you mean 'total_steps'?)"),
    ("optimizer.nme=adamw", "did you mean 'name'"),
    ("nothing", "expected --config.KEY=VALUE"),
    ("model.vision.kernel_sizes=(3,", "Python literal tuple"),
])
def test_override_mistakes_name_the_override(override, words):
    with pytest.raises(ConfigError) as info:
        train.load_config(DEMO, [override])
    assert words in str(info.value), f"--config.{override}: got {info.value}"


def test_overrides_read_integers_in_scientific_notation():
    assert train.load_config(DEMO, ["total_steps=1e4"]).total_steps == 10_000


def test_config_files_that_fail_are_named(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match=r"broken.py:1: "):
        train.load_config(str(broken))
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    return {}['x']\n")
    with pytest.raises(ConfigError, match=r"get_config\(\) failed: KeyError"):
        train.load_config(str(raising))
    with pytest.raises(ConfigError, match="no such file"):
        train.load_config(str(tmp_path / "missing.py"))
