"""The main job, ``python -m altjax.demos.align``, end to end at a tiny size: it prepares the scenes
dataset, evaluates before and after training, prints the results table, and writes
eval_results.json, metrics.jsonl and the figure."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import test_train
from altjax import train
from altjax.demos import align


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
    model = workdir / "model"
    assert out.splitlines()[-1] == (f"altjax-demo: model written to {model} (altjax format; load with "
                                    f"AlignModel.from_pretrained('{model}'), evaluate with altjax-eval --checkpoint "
                                    f"{model})"), f"the last line does not name the model:\n{out}"
    # tfds generated the scenes set: the demo's console shows none of what it prints.
    noise = [m for m in ("Downloading and preparing dataset", "dataset_info.json") if m in out + run.stderr]
    assert not noise, f"third-party messages on the demo's console: {noise}\n{out}\n{run.stderr}"

    keys = {"retrieval/scenes/en", "zeroshot/scenes/en"}
    before = json.load(open(workdir / "eval_before.json"))
    after = json.load(open(workdir / "eval_results.json"))
    assert set(before) == keys and set(after) == keys, f"evaluations {sorted(before)} / {sorted(after)}"
    assert before != after, "the evaluation did not change with training"
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, 9)), f"metrics.jsonl steps {steps}"

    figure = np.asarray(Image.open(workdir / "demo.png").convert("RGB")).astype(int)
    assert figure.shape == (680, 900, 3), f"figure shape {figure.shape}"
    curve = np.all(figure == (40, 85, 215), axis=-1)[:, :500].sum()
    thumbnails = np.all(figure == align.OTHER, axis=-1).sum() + np.all(figure == align.CORRECT, axis=-1).sum()
    assert curve > 50 and thumbnails > 1000, f"figure: {curve} loss-curve pixels, {thumbnails} frame pixels"
    # The legend's swatches below the examples, and the results table's text below the curve.
    legend = figure[470:500, 500:]
    swatches = [int(np.all(legend == colour, axis=-1).sum()) for colour in (align.CORRECT, align.OTHER)]
    table_ink = int((figure[515:, :480] < 128).all(axis=-1).sum())
    assert min(swatches) >= 15 * 15 and table_ink > 500, f"legend swatch pixels {swatches}, table ink {table_ink}"
    assert os.path.isdir(workdir / "model"), "no exported model"


def test_help_names_the_options_and_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        align.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0, f"--help exit status {exit_info.value.code}"
    wanted = ["--workdir", "--steps", "--config.KEY=VALUE", "--verbose",
              *(f"{code} {words.split()[0]}" for code, words in train.EXIT_CODES.items())]
    missing = [word for word in wanted if word not in text]
    assert not missing, f"the ALIGN demo's --help lacks {missing}:\n{text}"
