"""The two-phase AltCLIP run end to end through altjax-train's command line, at toy size."""
import json
import os

import pytest

from altjax import train
from altjax.demos import altclip

CONFIG = '''
from altjax.demos import altclip as d

SCENES = dict(image_size=64, num_train=256, num_validation=64, num_test=64, seed=0)


def get_config():
    c = getattr(d, "{phase}_config")({steps}, *{args})
    c.batch_size = 16
    c.log_every = 1
    c.data.scenes = SCENES
    c.data.data_dir = {data_dir!r}
    c.eval.batch_size = 64
    return c
'''


def _run(tmp_path, capsys, phase, args, model_class):
    path = tmp_path / f"{phase}.py"
    path.write_text(CONFIG.format(phase=phase, steps=2, args=args, data_dir=str(tmp_path / "data")))
    workdir = tmp_path / phase
    assert train.main(["--config", str(path), "--workdir", str(workdir)]) == 0, f"{phase} failed"
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"altjax-train: model written to {workdir / 'model'} (altjax format; load with "
                           f"{model_class}.from_pretrained("), f"{phase}: the last line does not name the model: {last}"
    metrics = train.read_metrics(str(workdir))
    assert [m["step"] for m in metrics] == [1, 2] and all("loss" in m for m in metrics), f"{phase}: {metrics}"
    with open(workdir / "eval_results.json") as f:
        results = json.load(f)
    assert set(results) == {"retrieval/scenes/en", "retrieval/scenes/zh"}, f"{phase}: {sorted(results)}"
    return str(workdir / "model"), metrics


def test_two_phases_through_the_cli(tmp_path, capsys):
    teacher, _ = _run(tmp_path, capsys, "teacher", (), "CLIPModel")
    student, metrics = _run(tmp_path, capsys, "phase1", (teacher,), "AltCLIPModel")
    assert all(m["same_language_fraction"] > 0 for m in metrics), "phase 1 batches without EN-EN pairs"
    _run(tmp_path, capsys, "phase2", (student,), "AltCLIPModel")
    assert os.path.isfile(os.path.join(tmp_path, "phase2", "model", "config.json"))


def test_help_names_the_options_and_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        altclip.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0, f"--help exit status {exit_info.value.code}"
    wanted = ["--workdir", "--scale", "--verbose", *(f"{code} {words.split()[0]}" for code, words in
                                                     train.EXIT_CODES.items())]
    missing = [word for word in wanted if word not in text]
    assert not missing, f"the AltCLIP demo's --help lacks {missing}:\n{text}"
