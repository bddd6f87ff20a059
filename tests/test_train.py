"""altjax-train end to end on a tiny ALIGN: exact resume after SIGTERM and SIGKILL, a damaged
latest checkpoint, a diverging run, damaged input records, the logs and the exported model.

One reference run (in this process, 8 simulated devices, with evaluations) is shared: the other
runs must reproduce its ``metrics.jsonl`` losses exactly, step for step.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from altjax import train
from altjax.data import scenes, webdataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
TOTAL = 24
N_RECORDS = 64
DAMAGED = (5, 40)  # records whose image bytes are not an image

# A tiny ALIGN (two EfficientNet stages, a one-layer BERT of width 16) on 16 px crops, with dropout
# and drop-connect on, so that the dropout keys are part of what must resume exactly.
TINY = [
    f"total_steps={TOTAL}", "batch_size=8", "log_every=1", "checkpoint_every=4", "keep_checkpoints=3",
    "eval_every=0", "eval.at_end=false",
    "model.projection_dim=16",
    "model.text={'vocab_size': -1, 'hidden_size': 16, 'num_hidden_layers': 1, 'num_attention_heads': 2, "
    "'intermediate_size': 32, 'max_position_embeddings': 16, 'hidden_dropout_prob': 0.1, "
    "'attention_probs_dropout_prob': 0.1}",
    "model.vision={'image_size': 16, 'width_coefficient': 1.0, 'depth_coefficient': 1.0, 'kernel_sizes': (3, 3), "
    "'in_channels': (32, 8), 'out_channels': (8, 16), 'strides': (1, 2), 'num_block_repeats': (1, 1), "
    "'expand_ratios': (1, 2), 'hidden_dim': 16, 'drop_connect_rate': 0.2, 'bn_group_size': None}",
    "data.source=webdataset", "data.image_key=jpg", "data.caption_key=txt", "data.max_length=16",
    "data.num_threads=1", "data.scenes={'image_size': 32, 'num_train': 32, 'num_validation': 16, "
    "'num_test': 16, 'seed': 0}",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Scenes as two WebDataset shards (two records damaged), and the tiny scenes dataset for evaluation."""
    root = tmp_path_factory.mktemp("data")
    samples = []
    for i in range(N_RECORDS):
        example = scenes.generate_example(0, "train", i, 32)
        image = b"not a jpeg" if i in DAMAGED else scenes.encode_jpeg(example["image"])
        samples.append({"__key__": f"{i:06d}", "jpg": image, "txt": example["caption_en"]})
    webdataset.write_shard(root / "shard-0.tar", samples[:N_RECORDS // 2])
    webdataset.write_shard(root / "shard-1.tar", samples[N_RECORDS // 2:])
    tfds_dir = str(root / "tfds")
    scenes.prepare(scenes.scenes_config(image_size=32, num_train=32, num_validation=16, num_test=16, seed=0),
                   data_dir=tfds_dir)
    return [f"data.files={root}/shard-*.tar", f"data.data_dir={tfds_dir}"]


def overrides(data, *extra):
    return TINY + data + list(extra)


def run_cli(workdir, data, *extra, **popen):
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")  # as tests/conftest.py sets in-process
    cmd = [sys.executable, "-m", "altjax.train", "--config", DEMO, "--workdir", str(workdir)]
    cmd += [f"--config.{o}" for o in overrides(data, *extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def losses(workdir):
    return [(r["step"], r["loss"]) for r in train.read_metrics(str(workdir))]


def assert_same_losses(workdir, reference, what):
    got, want = losses(workdir), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want], f"{what}: logged steps {[s for s, _ in got]}"
    diffs = [(s, a, b) for (s, a), (_, b) in zip(got, want) if a != b]
    assert not diffs, f"{what}: {len(diffs)} losses differ from the uninterrupted run, first (step, got, want) {diffs[0]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run, with evaluations every 12 steps and at the end."""
    workdir = tmp_path_factory.mktemp("reference")
    config = train.load_config(DEMO, overrides(data, "eval_every=12", "eval.at_end=true"))
    result = train.train(config, str(workdir))
    return workdir, result


def test_reference_run_writes_logs_evaluations_and_model(reference):
    workdir, result = reference
    records = train.read_metrics(str(workdir))
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1)), f"steps logged {[r['step'] for r in records]}"
    for key in ("loss", "learning_rate", "temperature", "examples_per_sec", "skipped_examples", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in records), f"metrics.jsonl: {key} missing or not finite"
    assert records[0]["learning_rate"] == 0.0, f"warmup starts at 0, got {records[0]['learning_rate']}"
    # 64 records minus 2 damaged leave 62 per epoch: 24 steps of 8 take 3 epochs and part of a
    # fourth, so each damaged record was met (and skipped) three or four times.
    skipped = [r["skipped_examples"] for r in records]
    assert 6 <= skipped[-1] <= 8 and skipped == sorted(skipped), f"skipped_examples over steps: {skipped}"

    results = json.load(open(workdir / "eval_results.json"))
    assert set(results) == {"retrieval/scenes/en", "zeroshot/scenes/en"}, f"eval_results keys {sorted(results)}"
    assert set(results["retrieval/scenes/en"]) >= {"t2i_r1", "i2t_r1", "mr"} and "top1" in results["zeroshot/scenes/en"]

    from tensorboardX.proto import event_pb2

    from altjax.data import tfrecord

    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    tags = {}
    for name in events:
        for record in tfrecord.iterate_tfrecord(os.path.join(workdir, name)):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    logged = dict(tags["train/loss"])
    assert sorted(logged) == list(range(1, TOTAL + 1)), f"TensorBoard train/loss steps {sorted(logged)}"
    assert abs(logged[TOTAL] - records[-1]["loss"]) < 1e-6, "TensorBoard loss differs from metrics.jsonl"
    assert [s for s, _ in tags["eval/retrieval/scenes/en/t2i_r1"]] == [12, 24], "evaluation steps in TensorBoard"

    config = json.load(open(workdir / "config.json"))
    assert config["total_steps"] == TOTAL and config["data"]["source"] == "webdataset", "config.json"

    from altjax import AlignModel, AlignProcessor

    model = AlignModel.from_pretrained(workdir / "model")
    processor = AlignProcessor.from_pretrained(workdir / "model")
    inputs = processor(text=["a small red circle on the left"], images=[np.zeros((32, 32, 3), np.uint8)])
    assert inputs["input_ids"].shape == (1, 16), f"exported processor pads to {inputs['input_ids'].shape[1]}, not 16"
    out = model(**inputs)
    assert np.isfinite(np.asarray(out.logits_per_image)).all(), "exported model gives non-finite logits"
    assert abs(float(model.temperature[...]) - records[-1]["temperature"]) < 1e-2, "exported temperature"


def test_sigterm_then_sigkill_then_resume_gives_the_same_losses(reference, data, tmp_path):
    workdir = tmp_path / "run"
    rng = np.random.default_rng()
    ckpts = workdir / "checkpoints"

    def steps():
        return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if ckpts.is_dir() else []

    def wait_for(condition, process, what):
        deadline = time.time() + 120
        while not condition():
            assert process.poll() is None, f"the run ended ({process.returncode}) before {what}: {process.stdout.read()}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    # Preemption: SIGTERM after the first checkpoint saves the current step and exits 143.
    first = run_cli(workdir, data)
    wait_for(lambda: bool(steps()), first, "the first checkpoint")
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == train.SIGTERM_EXIT, f"SIGTERM: exit {first.returncode}\n{out}"
    logged = [s for s, _ in losses(workdir)]
    assert "SIGTERM: saved step" in out and steps()[-1] == logged[-1], (
        f"SIGTERM: checkpoints {steps()} but the last logged step is {logged[-1]}")
    terminated_at = steps()[-1]

    # A hard kill at a random moment of the resumed run.
    delay = float(rng.uniform(0.0, 1.5))
    second = run_cli(workdir, data)
    wait_for(lambda: len(losses(workdir)) > terminated_at if (workdir / "metrics.jsonl").exists() else False,
             second, "the resumed run's first step")
    time.sleep(delay)
    second.kill()
    second.communicate(timeout=60)
    killed_at = len(losses(workdir))

    third = run_cli(workdir, data)
    out = third.communicate(timeout=300)[0]
    assert third.returncode == 0, f"resume after SIGKILL: exit {third.returncode}\n{out}"
    assert f"resumed from {ckpts}" in out, f"the last run did not resume:\n{out}"
    assert_same_losses(workdir, reference[0],
                       f"SIGTERM at step {terminated_at}, SIGKILL {delay:.2f}s into the resumed run (step {killed_at})")


def test_damaged_latest_checkpoint_falls_back_with_a_warning(reference, data, tmp_path, caplog):
    workdir = tmp_path / "damaged"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "model")
    # Truncate every array file of the newest checkpoint, as a disk that filled up would.
    latest = workdir / "checkpoints" / str(TOTAL)
    truncated = 0
    for folder, _, files in os.walk(latest / "state"):
        for name in files:
            if not name.endswith(".json") and not name.startswith("_"):
                open(os.path.join(folder, name), "wb").close()
                truncated += 1
    assert truncated, f"found no array files to damage under {latest}"
    with caplog.at_level("WARNING", logger="altjax.train"):
        train.train(train.load_config(DEMO, overrides(data)), str(workdir))
    warned = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert warned and f"/{TOTAL} cannot be restored" in warned[0], f"warnings: {warned}"
    assert_same_losses(workdir, reference[0], "resumed from the checkpoint before a damaged one")


def test_diverging_run_stops_keeps_the_last_good_checkpoint(reference, data, tmp_path, capsys):
    workdir = tmp_path / "diverged"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / str(TOTAL))
    shutil.rmtree(workdir / "checkpoints" / str(TOTAL - 4))  # the newest left is step 16
    before = sorted(os.listdir(workdir / "checkpoints"))
    args = ["--config", DEMO, "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides(data)]
    code = train.main(args + ["--config.optimizer.learning_rate=inf", "--config.optimizer.warmup_steps=0"])
    err = capsys.readouterr().err
    assert code == 1, f"exit status {code} for a diverging run\n{err}"
    assert "step 17:" in err and "training diverged" in err and "last good checkpoint is 16" in err, err
    after = sorted(os.listdir(workdir / "checkpoints"))
    assert after == before, f"checkpoints changed from {before} to {after}"
    assert [s for s, _ in losses(workdir)] == list(range(1, 17)), "metrics.jsonl has steps after the last good one"
