"""The two-phase AltCLIP run end to end through altjax-train's command line, at toy size."""
import json
import os

from altjax import train

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


def _run(tmp_path, phase, args):
    path = tmp_path / f"{phase}.py"
    path.write_text(CONFIG.format(phase=phase, steps=2, args=args, data_dir=str(tmp_path / "data")))
    workdir = tmp_path / phase
    assert train.main(["--config", str(path), "--workdir", str(workdir)]) == 0, f"{phase} failed"
    metrics = train.read_metrics(str(workdir))
    assert [m["step"] for m in metrics] == [1, 2] and all("loss" in m for m in metrics), f"{phase}: {metrics}"
    with open(workdir / "eval_results.json") as f:
        results = json.load(f)
    assert set(results) == {"retrieval/scenes/en", "retrieval/scenes/zh"}, f"{phase}: {sorted(results)}"
    return str(workdir / "model"), metrics


def test_two_phases_through_the_cli(tmp_path):
    teacher, _ = _run(tmp_path, "teacher", ())
    student, metrics = _run(tmp_path, "phase1", (teacher,))
    assert all(m["same_language_fraction"] > 0 for m in metrics), "phase 1 batches without EN-EN pairs"
    _run(tmp_path, "phase2", (student,))
    assert os.path.isfile(os.path.join(tmp_path, "phase2", "model", "config.json"))
