"""Training configs (altjax.training.config): the recipes by name or path, the ALIGN recipe's
numbers, the demo config, and command-line overrides."""
import dataclasses
import os

import pytest

from altjax import train
from altjax.data.preprocess import align_image_config
from altjax.models.align import AlignConfig
from altjax.training import optim
from altjax.training.checks import ConfigError
from altjax.training.config import validate
from altjax.training.tasks import TASKS
from altjax.training.tasks.align import model_config

ALIGN_BASE = os.path.join(train.CONFIGS_DIR, "align_base.py")
DEMO = os.path.join(train.CONFIGS_DIR, "demo.py")
SHARED_KEYS = ("total_steps", "batch_size", "seed", "log_every", "checkpoint_every", "eval_every", "profile")


def test_recipes_are_found_by_name_and_each_names_a_task_and_is_valid_or_says_what_it_needs():
    assert train.recipes() == ["align_base", "altclip_contrastive", "altclip_distill", "demo"], train.recipes()
    assert train.load_config("demo") == train.load_config(DEMO), "the recipe 'demo' is not configs/demo.py"
    assert validate(train.load_config("demo")) == []
    for name in train.recipes():
        assert train.load_config(name).task in TASKS, f"{name}: task {train.load_config(name).task!r}"
    with pytest.raises(ConfigError, match=r"--config demoo: no such file; give a recipe \(align_base, "):
        train.load_config("demoo")


def test_a_parameterised_config_file_gets_its_argument(tmp_path):
    sweep = tmp_path / "sweep.py"
    sweep.write_text("from altjax import train\n\n\ndef get_config(size):\n"
                     "    c = train.load_config('demo')\n    c.batch_size = {'small': 8, 'large': 128}[size]\n"
                     "    return c\n")
    assert train.load_config(f"{sweep}:small").batch_size == 8
    assert train.load_config(f"{sweep}:large", ["total_steps=3"]).total_steps == 3
    with pytest.raises(ConfigError, match=r"sweep.py:medium: get_config\(\) failed: KeyError: 'medium'"):
        train.load_config(f"{sweep}:medium")


@pytest.mark.parametrize("path", [ALIGN_BASE, DEMO])
def test_configs_have_the_shared_keys(path):
    config = train.load_config(path)
    missing = [k for k in SHARED_KEYS if k not in config]
    assert not missing, f"{os.path.basename(path)} lacks {missing}"


def test_align_base_is_the_align_recipe():
    c = train.load_config(ALIGN_BASE)
    recipe = {"batch_size": 16_384, "optimizer.name": "lamb", "optimizer.learning_rate": 1e-3,
              "optimizer.weight_decay": 1e-5, "optimizer.warmup_steps": 10_000, "optimizer.decay": "linear",
              "optimizer.end_factor": 0.0, "task": "align", "loss.label_smoothing": 0.1,
              "model.temperature_init_value": 1.0, "model.projection_dim": 640, "model.vision.image_size": 289,
              "data.augment": "random_crop"}
    for key, want in recipe.items():
        node = c
        for part in key.split("."):
            node = node[part]
        assert node == want, f"align_base {key} = {node!r}, the ALIGN recipe has {want!r}"

    # The model is align-base (EfficientNet-B7 + BERT-base, 640-d), plus per-replica BatchNorm, with
    # both towers' layers scanned (the layout benchmarks/compile.py found faster on every count).
    model = model_config(c, 30522)
    base = AlignConfig.from_preset("align-base")
    assert model.vision_config.bn_group_size == 16, f"bn_group_size {model.vision_config.bn_group_size}"
    assert (model.text_config.scan_layers, model.vision_config.scan_layers) == (True, True), "towers not scanned"
    assert model.text_config == dataclasses.replace(base.text_config, scan_layers=True), (
        f"text tower {model.text_config} != BERT-base")
    assert dataclasses.replace(model.vision_config, bn_group_size=None) == dataclasses.replace(
        base.vision_config, scan_layers=True), f"vision tower {model.vision_config} != align-base's EfficientNet-B7"
    assert (model.projection_dim, model.temperature_init_value) == (640, 1.0)

    # 346 -> 289: resized to 346 x 346, then a random 289 crop.
    image = align_image_config(c.model.vision.image_size)
    assert (image.size, image.crop_size) == ({"height": 346, "width": 346}, {"height": 289, "width": 289}), (
        f"image preprocessing {image.size} -> {image.crop_size}")

    # 10k warmup steps from 0 to 1e-3, then linear decay to 0 at the last step.
    lr = optim.schedule(c.optimizer, c.total_steps)
    half = 10_000 + (c.total_steps - 10_000) // 2
    got = {s: float(lr(s)) for s in (0, 5_000, 10_000, half, c.total_steps)}
    want = {0: 0.0, 5_000: 5e-4, 10_000: 1e-3, half: 5e-4, c.total_steps: 0.0}
    assert all(abs(got[s] - want[s]) < 1e-9 for s in want), f"learning rate {got}, expected {want}"


def test_demo_config_builds_a_consistent_model():
    from flax import nnx

    from altjax.models.align import AlignModel

    c = train.load_config(DEMO)
    assert c.data.source == "scenes" and c.data.tokenizer == "scenes" and c.model.preset == "align-tiny"
    config = model_config(c, 70)
    model = nnx.eval_shape(lambda: AlignModel(config, rngs=nnx.Rngs(0)))
    assert model.text_projection.kernel.shape == (64, 48), f"text projection {model.text_projection.kernel.shape}"
    assert config.text_config.vocab_size == 70, "vocab_size -1 should take the tokenizer's size"


def test_overrides_are_read_as_the_type_they_replace():
    c = train.load_config(DEMO, ["total_steps=7", "remat=true", "optimizer.learning_rate=0.5",
                                 "model.vision.strides=(1, 2, 2, 1)", "eval.datasets=('zeroshot/scenes/en',)",
                                 "data.tokenizer=/some/dir", "model.vision.bn_group_size=8",
                                 "model.text={'hidden_size': 8}", "freeze=^vision_model/"])
    assert (c.total_steps, c.remat, c.optimizer.learning_rate) == (7, True, 0.5)
    assert tuple(c.model.vision.strides) == (1, 2, 2, 1) and tuple(c.eval.datasets) == ("zeroshot/scenes/en",)
    assert c.data.tokenizer == "/some/dir" and c.model.vision.bn_group_size == 8 and c.freeze == "^vision_model/"
    assert dict(c.model.text) == {"hidden_size": 8}, f"model.text {dict(c.model.text)}"
    with pytest.raises(ConfigError, match="no key 'optimizer.lerning_rate'"):
        train.load_config(DEMO, ["optimizer.lerning_rate=1"])
    with pytest.raises(ConfigError, match="expected true or false"):
        train.load_config(DEMO, ["remat=maybe"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        train.load_config(DEMO, ["total_steps"])


def test_cli_errors_exit_2(tmp_path, capsys):
    code = train.main(["--config", DEMO, "--workdir", str(tmp_path), "--config.nonexistent=1"])
    assert code == 2 and "nonexistent" in capsys.readouterr().err, f"exit {code} for an unknown key"
    code = train.main(["--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)])
    assert code == 2 and "no such file" in capsys.readouterr().err, f"exit {code} for a missing config file"
    with pytest.raises(SystemExit):
        train.main(["--config", DEMO, "--workdir", str(tmp_path), "--steps=3"])
