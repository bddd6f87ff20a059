"""altjax-train end to end on a tiny ALIGN: exact resume after SIGTERM and SIGKILL, a damaged
latest checkpoint, a diverging run, damaged input records, the logs and the exported model.

Every run is an ``altjax-train`` process on 8 simulated CPU devices. One reference run (with
evaluations) is shared: an interrupted run must reproduce its ``metrics.jsonl`` losses exactly,
step for step. The runs share a JAX compilation cache, so only the first one compiles.
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
    "eval_every=0", "eval.at_start=false", "eval.at_end=false",
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


def event_class():
    """tensorflow.Event (the fields altjax writes) built with protobuf from TensorFlow's field
    numbers, to read the event files independently of altjax.tensorboard's encoder."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="altjax_test_event.proto", package="altjax_test", syntax="proto3")
    messages = {
        "Value": [("tag", 1, F.TYPE_STRING, None), ("simple_value", 2, F.TYPE_FLOAT, None)],
        "Summary": [("value", 1, F.TYPE_MESSAGE, "Value")],
        "SessionLog": [("status", 1, F.TYPE_INT32, None)],
        "Event": [("wall_time", 1, F.TYPE_DOUBLE, None), ("step", 2, F.TYPE_INT64, None),
                  ("file_version", 3, F.TYPE_STRING, None), ("summary", 5, F.TYPE_MESSAGE, "Summary"),
                  ("session_log", 7, F.TYPE_MESSAGE, "SessionLog")],
    }
    for name, fields in messages.items():
        message = proto.message_type.add(name=name)
        for field, number, kind, type_name in fields:
            label = F.LABEL_REPEATED if field == "value" else F.LABEL_OPTIONAL
            message.field.add(name=field, number=number, type=kind, label=label,
                              type_name=f".altjax_test.{type_name}" if type_name else None)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("altjax_test.Event"))


def read_events(workdir):
    """Every event of the workdir's TensorBoard files, file by file in creation order."""
    from altjax.data import tfrecord

    event = event_class()
    files = sorted(f for f in os.listdir(workdir) if f.startswith("events.out.tfevents."))
    return [event.FromString(r) for f in files for r in tfrecord.iterate_tfrecord(os.path.join(workdir, f))]


def overrides(data, *extra):
    return TINY + data + list(extra)


def jax_cache(tmp_path_factory) -> str:
    """A compilation cache for this test session's training processes (test_demo.py shares it)."""
    return str(tmp_path_factory.getbasetemp() / "jax-cache")


def cli_env(cache: str) -> dict:
    return dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",  # as tests/conftest.py sets in-process
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_cli(workdir, data, cache, *extra):
    cmd = [sys.executable, "-m", "altjax.train", "--config", DEMO, "--workdir", str(workdir)]
    cmd += [f"--config.{o}" for o in overrides(data, *extra)]
    return subprocess.Popen(cmd, env=cli_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, what: str, code: int = 0) -> str:
    out = process.communicate(timeout=300)[0]
    assert process.returncode == code, f"{what}: exit status {process.returncode}, expected {code}\n{out}"
    return out


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
    finish(run_cli(workdir, data, jax_cache(tmp_path_factory), "eval_every=12", "eval.at_end=true"), "reference run")
    return workdir


def test_reference_run_writes_logs_evaluations_and_model(reference):
    workdir = reference
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
    history = train.read_evals(str(workdir))
    assert [e["step"] for e in history] == [12, 24], f"evals.jsonl steps {[e['step'] for e in history]}"
    assert history[-1] == {"step": 24, **results}, "the last line of evals.jsonl is not eval_results.json"

    tags = {}
    for event in read_events(workdir):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    logged = dict(tags["train/loss"])
    assert sorted(logged) == list(range(1, TOTAL + 1)), f"TensorBoard train/loss steps {sorted(logged)}"
    assert abs(logged[TOTAL] - records[-1]["loss"]) < 1e-6, "TensorBoard loss differs from metrics.jsonl"
    assert [s for s, _ in tags["eval/retrieval/scenes/en/t2i_r1"]] == [12, 24], "evaluation steps in TensorBoard"

    config = json.load(open(workdir / "config.json"))
    assert config["total_steps"] == TOTAL and config["data"]["source"] == "webdataset", "config.json"

    from altjax import AlignModel, AlignProcessor

    # The exported model and processor load (test_demo.py embeds with them).
    model = AlignModel.from_pretrained(workdir / "model")
    processor = AlignProcessor.from_pretrained(workdir / "model")
    inputs = processor(text=["a small red circle on the left"], images=[np.zeros((32, 32, 3), np.uint8)])
    assert inputs["input_ids"].shape == (1, 16), f"exported processor pads to {inputs['input_ids'].shape[1]}, not 16"
    assert inputs["pixel_values"].shape == (1, 16, 16, 3), f"exported processor gives {inputs['pixel_values'].shape}"
    assert abs(float(model.temperature[...]) - records[-1]["temperature"]) < 1e-2, "exported temperature"


def test_rerunning_a_finished_run_changes_nothing(reference, data, tmp_path, tmp_path_factory):
    workdir = tmp_path / "finished"
    shutil.copytree(reference, workdir)
    before = {name: (workdir / name).read_bytes() for name in ("evals.jsonl", "eval_results.json", "metrics.jsonl")}
    exported = (workdir / "model" / "config.json").stat().st_mtime_ns
    out = finish(run_cli(workdir, data, jax_cache(tmp_path_factory), "eval_every=12", "eval.at_end=true"), "rerun")
    after = {name: (workdir / name).read_bytes() for name in before}
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"re-running a finished run rewrote {changed}\n{out}"
    assert (workdir / "model" / "config.json").stat().st_mtime_ns == exported, "the model was exported again"
    assert "resumed from" in out and "step 24/24" not in out and "step 24: " not in out, \
        f"the finished run trained or evaluated again:\n{out}"


def test_preempted_diverged_killed_and_damaged_run_ends_like_the_uninterrupted_one(reference, data, tmp_path,
                                                                                  tmp_path_factory):
    workdir, cache = tmp_path / "run", jax_cache(tmp_path_factory)
    ckpts = workdir / "checkpoints"
    rng = np.random.default_rng()

    def steps():
        return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if ckpts.is_dir() else []

    def logged():
        return [s for s, _ in losses(workdir)] if (workdir / "metrics.jsonl").exists() else []

    def wait_for(condition, process, what):
        deadline = time.time() + 120
        while not condition():
            assert process.poll() is None, f"the run ended ({process.returncode}) before {what}: {process.stdout.read()}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.005)

    # 1. Preemption: SIGTERM after the first checkpoint saves the current step and exits 143.
    run = run_cli(workdir, data, cache)
    wait_for(lambda: steps() and len(logged()) > steps()[0], run, "a step after the first checkpoint")
    run.send_signal(signal.SIGTERM)
    out = finish(run, "SIGTERM", train.SIGTERM_EXIT)
    assert "SIGTERM: saved step" in out and steps()[-1] == logged()[-1], (
        f"SIGTERM: checkpoints {steps()} but the last logged step is {logged()[-1]}")
    preempted = steps()[-1]

    # 2. Divergence: an infinite learning rate stops the resumed run at its first step, exit 1,
    # with nothing of that step saved.
    before = steps()
    out = finish(run_cli(workdir, data, cache, "optimizer.learning_rate=inf"), "diverging run", 1)
    assert f"step {preempted + 1}:" in out and "training diverged" in out and (
        f"last good checkpoint is {preempted} " in out), f"divergence message:\n{out}"
    assert steps() == before and logged() == list(range(1, preempted + 1)), (
        f"after divergence: checkpoints {steps()} (were {before}), logged steps end at {logged()[-1:]}")

    # 3. A hard kill after a random number of steps of the resumed run.
    kill_after = preempted + int(rng.integers(1, TOTAL - preempted - 3))
    run = run_cli(workdir, data, cache)
    wait_for(lambda: len(logged()) >= kill_after, run, f"step {kill_after}")
    time.sleep(float(rng.uniform(0.0, 0.03)))
    run.kill()
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL, f"the run ended ({run.returncode}) before SIGKILL at step {kill_after}"
    killed = f"SIGTERM at step {preempted}, SIGKILL at step {logged()[-1]} (checkpoints {steps()})"

    # 4. The newest checkpoint damaged (its array files emptied, as by a full disk): the run warns,
    # resumes from the one before, and ends with the uninterrupted run's losses.
    damaged = steps()[-1]
    emptied = 0
    for folder, _, files in os.walk(ckpts / str(damaged) / "state"):
        for name in files:
            if not name.endswith(".json") and not name.startswith("_"):
                open(os.path.join(folder, name), "wb").close()
                emptied += 1
    assert emptied, f"found no array files to damage in checkpoint {damaged}"
    out = finish(run_cli(workdir, data, cache), f"resume after {killed}")
    assert f"/{damaged} cannot be restored" in out and f"resumed from {ckpts}/" in out, f"no fallback:\n{out}"
    # Each resumed run told TensorBoard to drop what earlier runs logged from its first step on.
    resumed = [int(line.rsplit("/", 1)[1]) for line in out.splitlines() if line.startswith("resumed from")]
    starts = [e.step for e in read_events(workdir) if e.session_log.status == 1]
    assert resumed and starts and starts[-1] == resumed[-1] + 1, f"SessionLog START at {starts}, resumed at {resumed}"
    assert_same_losses(workdir, reference, f"{killed}, checkpoint {damaged} damaged")
