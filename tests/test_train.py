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
    """The uninterrupted run, with evaluations every 12 steps and at the end, and steps 3 and 4
    traced by the profiler (which the runs compared with it are not: it changes no loss)."""
    workdir = tmp_path_factory.mktemp("reference")
    out = finish(run_cli(workdir, data, jax_cache(tmp_path_factory), "eval_every=12", "eval.at_end=true",
                         "profile.start_step=3", "profile.num_steps=2"), "reference run")
    (workdir.parent / f"{workdir.name}.out").write_text(out)
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

    traces = list((workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    out = (workdir.parent / f"{workdir.name}.out").read_text()
    assert len(traces) == 1 and f"profile: traced steps 3, 4 into {workdir / 'profile'}" in out, \
        f"profile traces {traces}, console:\n{out}"

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

    # Colleagues on a shared filesystem read what the run wrote: every mode is the umask's.
    umask = os.umask(0o022)
    os.umask(umask)
    wrong = []
    for folder, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(folder, name)
            want = (0o777 if os.path.isdir(path) else 0o666) & ~umask
            if os.stat(path).st_mode & 0o777 != want:
                wrong.append(f"{os.path.relpath(path, workdir)} {os.stat(path).st_mode & 0o777:o} (want {want:o})")
    assert not wrong, f"{len(wrong)} paths of the workdir have other permissions than the umask gives: {wrong[:5]}"

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
    # Nothing was trained in this process: no progress bar, no rate.
    assert "training:" not in out and "steps/s" not in out, f"the finished run shows a progress rate:\n{out}"
    model = workdir / "model"
    assert out.splitlines()[-1] == (f"altjax-train: model written to {model} (altjax format; load with "
                                    f"AlignModel.from_pretrained('{model}'), evaluate with altjax-eval --checkpoint "
                                    f"{model})"), f"the last line does not name the model:\n{out}"


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

    # 2. Divergence: a learning rate that overflows float32 stops the resumed run at its first step, exit 1,
    # with nothing of that step saved.
    before = steps()
    out = finish(run_cli(workdir, data, cache, "optimizer.learning_rate=1e39"), "diverging run", 1)
    assert f"step {preempted + 1}:" in out and "training diverged" in out and (
        f"last good checkpoint is {preempted} " in out), f"divergence message:\n{out}"
    assert steps() == before and logged() == list(range(1, preempted + 1)), (
        f"after divergence: checkpoints {steps()} (were {before}), logged steps end at {logged()[-1:]}")

    # 3. Ctrl-C: like SIGTERM, the current step is saved and the run exits 130, saying so.
    run = run_cli(workdir, data, cache)
    wait_for(lambda: len(logged()) > preempted + 1, run, f"step {preempted + 2}")
    run.send_signal(signal.SIGINT)
    out = finish(run, "SIGINT", train.SIGINT_EXIT)
    assert "SIGINT: saved step" in out and "Traceback" not in out and steps()[-1] == logged()[-1], (
        f"SIGINT: checkpoints {steps()}, last logged step {logged()[-1]}:\n{out}")
    assert not [d for d in os.listdir(ckpts) if "tmp" in d], f"temporary checkpoint directories left: {os.listdir(ckpts)}"
    preempted = steps()[-1]

    # 4. A hard kill after a random number of steps of the resumed run.
    kill_after = preempted + int(rng.integers(1, TOTAL - preempted - 3))
    run = run_cli(workdir, data, cache)
    wait_for(lambda: len(logged()) >= kill_after, run, f"step {kill_after}")
    time.sleep(float(rng.uniform(0.0, 0.03)))
    run.kill()
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL, f"the run ended ({run.returncode}) before SIGKILL at step {kill_after}"
    killed = f"SIGTERM, SIGINT at step {preempted}, SIGKILL at step {logged()[-1]} (checkpoints {steps()})"

    # 5. The newest checkpoint damaged (its array files emptied, as by a full disk): the run warns,
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


# ----- a user's mistakes, a second run, storage failures -----

def run_main(capsys, *argv):
    """``altjax-train ARGV`` in this process: (exit status, stderr lines)."""
    status = train.main(list(argv))
    return status, capsys.readouterr().err.strip().splitlines()


def test_help_names_every_task_recipe_and_exit_status(capsys):
    from altjax.training.tasks import TASKS

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0, f"--help exit status {exit_info.value.code}"
    wanted = [*TASKS, *train.recipes(), "--config.KEY=VALUE", "--print-config", "--verbose"]
    wanted += [f"{code} {words.split()[0]}" for code, words in train.EXIT_CODES.items()]
    missing = [word for word in wanted if word not in text]
    assert not missing, f"altjax-train --help lacks {missing}:\n{text}"
    assert "130" in text and "143" in text, "the exit statuses of SIGINT / SIGTERM are missing"


def test_print_config_prints_every_key_with_the_overrides(capsys):
    status = train.main(["--config", "demo", "--print-config", "--config.total_steps=7"])
    out = capsys.readouterr().out
    expected = train.load_config("demo", ["total_steps=7"])
    assert status == 0 and out.strip() == str(expected).strip(), f"status {status}, printed:\n{out}"
    assert "total_steps: 7" in out, out


def tree(path):
    """{relative path: bytes} of every file under ``path``."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def assert_one_error_line(status, lines, *words, code=2):
    assert status == code and len(lines) == 1 and lines[0].startswith("altjax-train: error: "), (
        f"exit status {status} (expected {code}), stderr:\n" + "\n".join(lines))
    for word in words:
        assert word in lines[0], f"{word!r} missing from {lines[0]!r}"


@pytest.mark.parametrize("extra, words", [
    (["--config.batch_size=12"], ["batch_size: 12 is not a multiple of the 8 data-parallel devices"]),
    (["--config.optimizer.name=adam"], ["optimizer.name: unknown 'adam'"]),
    (["--config.loss.kind=sigmod"], ["loss.kind: unknown 'sigmod'"]),
    (["--config.total_steps=-5"], ["total_steps: must be at least 1"]),
    (["--config.data.source=webdataset", "--config.data.files=/no/such/shard-*.tar"], ["data.files: no file matches"]),
    (["--config.model.init_from=/no/such/model"], ["model.init_from: /no/such/model is not a directory"]),
    (["--config.total_steps", "abc"], ["--config.total_steps=abc: expected an integer"]),
    (["--config.data.tokenizer=TOKENIZER"], ["data.tokenizer: ", "holds no tokenizer"]),
])
def test_a_mistake_costs_one_line_and_writes_nothing(tmp_path, capsys, extra, words):
    (tmp_path / "empty").mkdir()
    extra = [e.replace("TOKENIZER", str(tmp_path / "empty")) for e in extra]
    workdir = tmp_path / "run"
    status, lines = run_main(capsys, "--config", DEMO, "--workdir", str(workdir), *extra)
    assert_one_error_line(status, lines, *words)
    assert not workdir.exists(), f"the refused run left {sorted(tree(workdir))}"


def test_a_workdir_that_is_a_file_or_foreign_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    status, lines = run_main(capsys, "--config", DEMO, "--workdir", str(tmp_path / "notes.txt"))
    assert_one_error_line(status, lines, "is a file, not a directory")
    status, lines = run_main(capsys, "--config", DEMO, "--workdir", str(tmp_path))
    assert_one_error_line(status, lines, "holds files altjax did not write (notes.txt)")
    assert tree(tmp_path) == {"notes.txt": b"mine"}


def test_a_refused_resume_leaves_every_file_as_it_was(reference, data, tmp_path, capsys):
    workdir = tmp_path / "finished"
    shutil.copytree(reference, workdir)
    before = tree(workdir)
    status, lines = run_main(capsys, "--config", DEMO, "--workdir", str(workdir),
                             *[f"--config.{o}" for o in overrides(data, "batch_size=16", "optimizer.name=adamw")])
    assert_one_error_line(status, lines, "batch_size: 8 -> 16", 'optimizer.name: "lamb" -> "adamw"',
                          f"resume with the config in {workdir}/config.json")
    after = tree(workdir)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the refused resume changed {changed}"


def test_a_second_run_on_a_workdir_is_refused_naming_the_first(reference, data, tmp_path, capsys):
    workdir = tmp_path / "busy"
    shutil.copytree(reference, workdir)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from altjax import workdir; lock = workdir.RunLock(sys.argv[1]); lock.acquire(); "
        "lock.record(); print('locked', flush=True); time.sleep(60)"), str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(workdir)
        start = time.monotonic()
        status, lines = run_main(capsys, "--config", DEMO, "--workdir", str(workdir),
                                 *[f"--config.{o}" for o in overrides(data)])
        assert time.monotonic() - start < 10, "the second run took more than seconds to give up"
        assert_one_error_line(status, lines, "another run is training in it", f"pid {holder.pid}")
        assert tree(workdir) == before, "the refused run changed the workdir"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_failed_background_save_stops_the_run_at_the_next_step(data, tmp_path, tmp_path_factory):
    """The save of step 8 fails in orbax's background thread (no space left): the run stops within a
    step with one line naming the step, the cause and the last good checkpoint. The loss of this run
    is held at chance (learning rate 0), which the trainer must say after 3 steps."""
    workdir = tmp_path / "full"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "faulty_storage.py"), "full:8", "--config", DEMO,
           "--workdir", str(workdir)]
    cmd += [f"--config.{o}" for o in overrides(data, "optimizer.learning_rate=0.0", "optimizer.warmup_steps=0",
                                               "warn_chance_steps=3")]
    out = subprocess.run(cmd, env=cli_env(jax_cache(tmp_path_factory)), capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("altjax-train: error: ")]
    assert out.returncode == 1 and len(errors) == 1, f"exit status {out.returncode}, error lines {errors}\n{out.stderr}"
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, out.stderr
    assert errors[0].startswith("altjax-train: error: saving the checkpoint of step 8 failed (OSError: [Errno 28] "
                                "No space left on device") and "the last good checkpoint is 4" in errors[0], errors[0]
    logged = [r["step"] for r in train.read_metrics(str(workdir))]
    assert 8 <= logged[-1] <= 10, f"the run went on to step {logged[-1]} after the save of step 8 failed"
    warned = [line for line in out.stderr.splitlines() if "stayed at chance level" in line]
    assert len(warned) == 1 and "step 3:" in warned[0], f"chance warnings: {warned}"


def test_a_second_ctrl_c_exits_at_once_without_temporary_checkpoints(data, tmp_path, tmp_path_factory):
    """Every save stalls for a minute; Ctrl-C asks for a checkpoint, a second Ctrl-C while the save
    is being written exits at once and removes its temporary directory."""
    workdir = tmp_path / "stuck"
    ckpts = workdir / "checkpoints"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "faulty_storage.py"), "slow:60", "--config", DEMO,
           "--workdir", str(workdir)]
    cmd += [f"--config.{o}" for o in overrides(data)]
    run = subprocess.Popen(cmd, env=cli_env(jax_cache(tmp_path_factory)), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (ckpts.is_dir() and [d for d in os.listdir(ckpts) if "tmp" in d]):
        assert run.poll() is None, f"the run ended ({run.returncode}): {run.stdout.read()}"
        assert time.time() < deadline, "no save started"
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    start = time.monotonic()
    out = finish(run, "second SIGINT", train.SIGINT_EXIT)
    assert time.monotonic() - start < 10, "the second Ctrl-C did not exit at once"
    assert "SIGINT again: exiting without saving" in out and "Traceback" not in out, out
    assert not [d for d in os.listdir(ckpts) if "tmp" in d], f"left behind: {os.listdir(ckpts)}"


def test_logs_keep_one_record_per_step_on_resume(tmp_path):
    log = train.MetricsLog(str(tmp_path / "metrics.jsonl"), True)
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 1, 2, 3, 4)] + [{"step": 2, "loss": -2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')
    log.truncate(3)
    records = train.read_metrics(str(tmp_path))
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": -2.0}, {"step": 3, "loss": 3.0}], records


def test_every_process_of_a_refused_run_stops_with_the_same_line(reference, data, tmp_path):
    """Two processes (jax.distributed on localhost): process 0 finds the workdir locked by another
    run; both exit with status 2 and process 0's line, neither waits for the other in a collective."""
    import socket

    workdir = tmp_path / "busy"
    shutil.copytree(reference, workdir)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from altjax import workdir; lock = workdir.RunLock(sys.argv[1]); lock.acquire(); "
        "lock.record(); print('locked', flush=True); time.sleep(120)"), str(workdir)], stdout=subprocess.PIPE, text=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    try:
        assert holder.stdout.readline().strip() == "locked"
        procs = [subprocess.Popen(
            [sys.executable, "-m", "altjax.train", "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), "--config", DEMO, "--workdir", str(workdir),
             *[f"--config.{o}" for o in overrides(data)]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=120)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AssertionError("a process of the refused run did not exit within 120 s")
        for i, (p, out) in enumerate(zip(procs, outs)):
            errors = [line for line in out.splitlines() if line.startswith("altjax-train: error: ")]
            assert p.returncode == 2 and len(errors) == 1 and f"pid {holder.pid}" in errors[0], (
                f"process {i}: exit status {p.returncode}\n{out}")
            assert "Traceback" not in out, f"process {i}:\n{out}"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_chance_watch_warns_once_after_patience_steps_at_chance_past_warmup():
    watch = train.ChanceWatch(chance=2.0, patience=3, warmup=2)
    losses_ = [2.1, 2.1, 2.0, 1.5, 2.0, 1.99, 2.3, 2.0, 2.0, 2.0]
    warnings = {step: watch.update(step, loss) for step, loss in enumerate(losses_, start=1)}
    fired = {step: w for step, w in warnings.items() if w}
    assert list(fired) == [7] and "since step 5" in fired[7], f"warnings at {fired}"
    assert not any(train.ChanceWatch(None, 3, 0).update(s, 9.0) for s in range(1, 10)), "no chance level: no warning"
    assert not any(train.ChanceWatch(2.0, 0, 0).update(s, 9.0) for s in range(1, 10)), "patience 0: no warning"


def test_unreadable_evaluation_images_are_skipped_counted_and_named(data, tmp_path, caplog, monkeypatch):
    """An evaluation set with a damaged image: the run goes on, the image is left out of the
    metrics, eval_results.json counts it and a warning names the file."""
    folder = tmp_path / "evalset"
    folder.mkdir()
    lines = []
    for i in range(8):
        example = scenes.generate_example(0, "test", i, 32)
        (folder / f"{i}.jpg").write_bytes(scenes.encode_jpeg(example["image"]))
        lines.append(f"{i}.jpg\t{example['caption_en']}")
    (folder / "3.jpg").write_bytes(b"not a jpeg")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # eval.datasets names a folder relative to the working directory
    config = train.load_config(DEMO, overrides(data, "total_steps=2", "eval.at_end=true",
                                               "eval.datasets=('retrieval/evalset/en',)", "eval.split="))
    with caplog.at_level("WARNING", logger="altjax.train"):
        result = train.train(config, str(tmp_path / "run"))
    metrics = result["eval"][f"retrieval/{folder.name}/en"]
    assert metrics["skipped_images"] == 1, metrics
    assert 0 <= metrics["t2i_r1"] <= 100, metrics
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert saved[f"retrieval/{folder.name}/en"]["skipped_images"] == 1, saved
    warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 1 and "3.jpg" in warned[0] and "skipped 1 of 8" in warned[0], warned
