"""The main job, ``python -m altjax.demos.align``, end to end at a tiny size: it prepares the scenes
dataset, evaluates before and after training, prints the results table, and writes
eval_results.json, metrics.jsonl and the figure."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import test_train


def test_demo_runs_end_to_end(tmp_path, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("demo-tfds"))
    workdir = tmp_path / "demo"
    # test_train's tiny model, so that the compilation cache it filled serves here too.
    overrides = [o for o in test_train.TINY if not o.startswith(("data.source", "data.image_key", "data.caption_key",
                                                                 "eval.at_start", "eval.at_end"))]
    overrides += [f"data.data_dir={data_dir}", "total_steps=8", "eval.at_start=true", "eval.at_end=true"]
    cmd = [sys.executable, "-m", "altjax.demos.align", "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides]
    run = subprocess.run(cmd, env=test_train.cli_env(test_train.jax_cache(tmp_path_factory)), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"demo exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    out = run.stdout
    for row in ("text->image R@1", "image->text R@1", "zero-shot top-1"):
        assert row in out, f"results table lacks {row!r}:\n{out}"
    assert "chance" in out and "before" in out and "after" in out and "step 8/8" in run.stderr, out

    keys = {"retrieval/scenes/en", "zeroshot/scenes/en"}
    before = json.load(open(workdir / "eval_before.json"))
    after = json.load(open(workdir / "eval_results.json"))
    assert set(before) == keys and set(after) == keys, f"evaluations {sorted(before)} / {sorted(after)}"
    assert before != after, "the evaluation did not change with training"
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, 9)), f"metrics.jsonl steps {steps}"

    figure = np.asarray(Image.open(workdir / "demo.png").convert("RGB")).astype(int)
    assert figure.shape == (520, 900, 3), f"figure shape {figure.shape}"
    curve = np.all(figure == (40, 85, 215), axis=-1)[:, :500].sum()
    thumbnails = np.all(figure == (160, 160, 160), axis=-1).sum() + np.all(figure == (45, 165, 65), axis=-1).sum()
    assert curve > 50 and thumbnails > 1000, f"figure: {curve} loss-curve pixels, {thumbnails} frame pixels"
    assert os.path.isdir(workdir / "model"), "no exported model"
