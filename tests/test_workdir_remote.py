"""A workdir in an object store (``gs://bucket/run``): everything altjax writes into a workdir goes
through etils.epath, so it works wherever epath's filesystem for the scheme is installed.

The store is fsspec's in-memory filesystem registered for ``gs://`` (epath opens gs:// through
fsspec when TensorFlow is absent), made to behave as an object store: directories are only
prefixes of objects (mkdir creates nothing) and objects cannot be appended to. Nothing of it is
on the local disk, and the tests run in an empty working directory: a stray ``os`` call on a
``gs://`` path would read nothing there or write a local ``gs:`` directory, which the fixture
reports.
"""
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry

from altjax import fsutil
from altjax import workdir as workdirs
from altjax.data import tfrecord
from altjax.evaluation.results import read_results, write_results
from altjax.training.logs import MetricsLog, read_evals, read_metrics

RUN = "gs://bucket/run"


class ObjectStore(MemoryFileSystem):
    """gs:// in memory, with an object store's limits."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"{path}: an object store cannot append")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def store(monkeypatch, tmp_path):
    ObjectStore.store.clear()
    ObjectStore.pseudo_dirs[:] = [""]
    for name in ObjectStore.protocol:
        monkeypatch.setitem(fsspec_registry, name, ObjectStore)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    if epath.Path(RUN)._backend is not epath_backend.fsspec_backend:
        pytest.skip("epath opens gs:// through TensorFlow here, not fsspec")
    monkeypatch.setattr(workdirs.RunLock, "SETTLE_SECONDS", 0.0)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield ObjectStore.store
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    stray = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    assert not stray, f"local files written for gs:// paths: {stray}"


def objects(store, prefix=RUN) -> list[str]:
    """The names of the objects under ``prefix``, relative to it."""
    return sorted(name[len(prefix) + 1:] for name in store if name.startswith(prefix + "/"))


# ----- ownership and the lock -----

def test_new_and_altjax_workdirs_are_usable_and_foreign_ones_refused(store):
    workdirs.check_usable(RUN)
    epath.Path(f"{RUN}/config.json").write_text(json.dumps(
        {"total_steps": 1, "batch_size": 8, "model": {}, "data": {}, "optimizer": {}}))
    workdirs.check_usable(RUN)
    epath.Path("gs://bucket/mine/notes.txt").write_text("mine")
    with pytest.raises(workdirs.WorkdirError, match=r"holds files altjax did not write \(notes.txt\)"):
        workdirs.check_usable("gs://bucket/mine")
    with pytest.raises(workdirs.WorkdirError, match="is a file, not a directory"):
        workdirs.check_usable("gs://bucket/mine/notes.txt")
    assert objects(store, "gs://bucket/mine") == ["notes.txt"], "checking a workdir wrote into it"


def test_a_second_run_is_refused_and_a_released_lock_is_gone(store):
    lock = workdirs.RunLock(RUN)
    lock.acquire()
    lock.record()
    holder = json.loads(store[f"{RUN}/run.lock"].getvalue())
    assert holder["pid"] == os.getpid() and holder["host"], f"lock record: {holder}"

    workdirs.check_usable(RUN)  # the lock alone makes it an altjax workdir
    before = store[f"{RUN}/run.lock"].getvalue()
    with pytest.raises(workdirs.WorkdirError) as info:
        workdirs.RunLock(RUN).acquire()
    message = str(info.value)
    assert "another run is training in it" in message and f"pid {os.getpid()}" in message, message
    assert f"delete {RUN}/run.lock" in message, f"the message does not say how to remove a stale lock: {message}"
    assert store[f"{RUN}/run.lock"].getvalue() == before, "a refused run changed the lock file"

    lock.release()
    assert objects(store) == [], f"a released lock left {objects(store)}"
    again = workdirs.RunLock(RUN)
    again.acquire()
    assert again.created, "a lock taken in an empty workdir should count as created"
    again.release()


def test_a_killed_runs_lock_is_reported_as_possibly_stale(store):
    epath.Path(f"{RUN}/run.lock").write_text(json.dumps({"host": "gone", "pid": 7, "started": "2026-01-01T00:00:00"}))
    with pytest.raises(workdirs.WorkdirError, match="host gone, pid 7, started 2026-01-01.*killed before it could "
                                                    "remove its lock.*delete gs://bucket/run/run.lock"):
        workdirs.RunLock(RUN).acquire()
    epath.Path(f"{RUN}/run.lock").unlink()
    lock = workdirs.RunLock(RUN)
    lock.acquire()
    lock.release()


def test_of_two_runs_starting_together_the_last_writer_keeps_the_lock(store, monkeypatch):
    other = json.dumps({"host": "other", "pid": 8, "started": "2026-01-01T00:00:00", "token": "theirs"})

    def other_writes_meanwhile(seconds):
        epath.Path(f"{RUN}/run.lock").write_text(other)

    monkeypatch.setattr(workdirs.time, "sleep", other_writes_meanwhile)
    lock = workdirs.RunLock(RUN)
    with pytest.raises(workdirs.WorkdirError, match="another run took it at the same moment .host other, pid 8"):
        lock.acquire()
    lock.release()
    assert store[f"{RUN}/run.lock"].getvalue().decode() == other, "the refused run touched the other run's lock"


def test_claim_locks_a_remote_workdir_and_abandon_leaves_nothing(store):
    import ml_collections

    from altjax.training import loop

    config = ml_collections.ConfigDict({"total_steps": 1, "batch_size": 8, "model": {}, "data": {}, "optimizer": {}})
    assert workdirs.absolute(RUN + "/") == RUN, workdirs.absolute(RUN + "/")
    claim = loop.claim_workdir(config, RUN)
    assert objects(store) == ["run.lock"], objects(store)
    with pytest.raises(workdirs.WorkdirError, match="another run is training in it"):
        loop.claim_workdir(config, RUN)
    assert objects(store) == ["run.lock"], f"the refused claim changed the workdir: {objects(store)}"
    claim.abandon()
    assert objects(store) == [], f"an abandoned claim left {objects(store)}"


# ----- files of the run -----

def test_config_is_written_atomically_and_read_back(store):
    config = {"total_steps": 10, "batch_size": 8, "model": {"preset": "tiny"}, "data": {}, "optimizer": {}}
    assert workdirs.read_config(RUN) is None
    for steps in (10, 20):
        workdirs.write_text_atomic(f"{RUN}/config.json", json.dumps({**config, "total_steps": steps}))
        assert workdirs.read_config(RUN) == {**config, "total_steps": steps}
    assert objects(store) == ["config.json"], f"temporary files left: {objects(store)}"
    assert not workdirs.has_checkpoints(RUN)
    epath.Path(f"{RUN}/checkpoints/4/state/x").write_text("")
    assert workdirs.has_checkpoints(RUN)
    epath.Path(f"{RUN}/config.json").write_text("{not json")
    with pytest.raises(workdirs.WorkdirError, match="config.json: cannot be read"):
        workdirs.read_config(RUN)


def test_metrics_log_appends_truncates_and_reads_without_appending_to_objects(store):
    path = f"{RUN}/metrics.jsonl"
    log = MetricsLog(path, True)
    log.truncate(0)  # a fresh run: nothing to cut
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in read_metrics(RUN)] == [1, 2, 3, 4, 5]

    # A resume: a step logged twice and a half-written line, cut back to step 3.
    epath.Path(path).write_text(epath.Path(path).read_text() + '{"step": 2, "loss": 9}\n{"step": 6, "lo')
    resumed = MetricsLog(path, True)
    resumed.truncate(3)
    records = read_metrics(RUN)
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 9}, {"step": 3, "loss": 1 / 3}], records
    resumed.write({"step": 4, "loss": 0.1})
    assert [r["step"] for r in read_metrics(RUN)] == [1, 2, 3, 4]
    assert objects(store) == ["metrics.jsonl"], f"temporary files left: {objects(store)}"

    evals = MetricsLog(f"{RUN}/evals.jsonl", True)
    evals.write({"step": 4, "retrieval/scenes/en": {"t2i_r1": 50.0}})
    assert read_evals(RUN) == [{"step": 4, "retrieval/scenes/en": {"t2i_r1": 50.0}}]
    MetricsLog(f"{RUN}/off.jsonl", False).write({"step": 1})
    assert "off.jsonl" not in objects(store), "a disabled log (not process 0) wrote"


def test_results_merge_and_refuse_to_overwrite_other_files(store):
    path = f"{RUN}/eval_results.json"
    assert read_results(path) == {}
    write_results(path, {"a": {"x": 1.0}})
    merged = write_results(path, {"b": {"y": 2.0}})
    assert merged == read_results(path) == {"a": {"x": 1.0}, "b": {"y": 2.0}}, read_results(path)
    assert objects(store) == ["eval_results.json"], f"temporary files left: {objects(store)}"
    epath.Path(f"{RUN}/other.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object of evaluations; not overwriting it"):
        write_results(f"{RUN}/other.json", {"a": {}})
    assert epath.Path(f"{RUN}/other.json").read_text() == "[1, 2]"


def read_events(store, tmp_path):
    """Every event of the run's event files, file by file, parsed with checksums verified."""
    from test_train import event_class

    event = event_class()
    files = [name for name in objects(store) if name.startswith("events.out.tfevents.")]
    out = []
    for i, name in enumerate(files):
        local = tmp_path / f"events-{i}"
        local.write_bytes(epath.Path(f"{RUN}/{name}").read_bytes())
        out.append([event.FromString(r) for r in tfrecord.iterate_tfrecord(local)])
    return out


def test_event_files_are_whole_after_each_flush_and_roll_over(store, tmp_path, monkeypatch):
    from altjax import tensorboard

    writer = tensorboard.EventWriter(RUN, purge_step=5)
    writer.add_scalar("train/loss", 0.5, 5)
    assert len(read_events(store, tmp_path)[0]) == 2, "events not flushed yet reached the store"
    writer.flush()
    (events,) = read_events(store, tmp_path)
    assert events[0].file_version == "brain.Event:2", events[0]
    assert events[1].step == 5 and events[1].session_log.status == 1, f"no purge at step 5: {events[1]}"
    assert (events[2].step, events[2].summary.value[0].tag, events[2].summary.value[0].simple_value) == \
        (5, "train/loss", 0.5), events[2]

    # Past the size limit a new file is started; together the files hold every event in order.
    monkeypatch.setattr(tensorboard, "REMOTE_FILE_BYTES", 200)
    for step in range(6, 30):
        writer.add_scalar("train/loss", float(step), step)
        writer.flush()
    writer.close()
    files = read_events(store, tmp_path)
    assert len(files) > 2, f"expected the file to roll over, got {len(files)} files"
    assert all(f[0].file_version == "brain.Event:2" for f in files), "a rolled-over file lacks its version header"
    steps = [e.step for f in files for e in f if e.summary.value]
    assert steps == list(range(5, 30)), f"scalar steps across the files: {steps}"


# ----- the exported model and the processor -----

def download(remote: str, local) -> None:
    for root, _, files in epath.Path(remote).walk():
        for name in files:
            target = local / os.path.relpath(str(root / name), remote)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((root / name).read_bytes())


def test_save_pretrained_to_the_store_and_back(store, tmp_path):
    from altjax.model_io import directories, engine
    from altjax.models.clip import CLIPModel
    from helpers import tiny_hf_dir

    tiny_hf_dir(tmp_path / "hf", "clip")
    model = CLIPModel.from_pretrained(tmp_path / "hf")
    expected = engine.model_params(model)
    processor_files = sorted(n for n in os.listdir(tmp_path / "hf") if n in directories.PROCESSOR_FILES)
    assert processor_files, f"the tiny model has no processor files: {os.listdir(tmp_path / 'hf')}"

    # As the trainer does: the processor published into the workdir, the model exported beside it.
    fsutil.publish_remote_dir(tmp_path / "hf", f"{RUN}/processor")
    model.name_or_path = f"{RUN}/processor"
    model.save_pretrained(f"{RUN}/model")
    names = objects(store, f"{RUN}/model")
    assert "config.json" in names and any(n.startswith("params/") for n in names), names
    assert sorted(n for n in names if "/" not in n) == sorted(["config.json", *processor_files]), names
    assert directories.is_altjax_output(f"{RUN}/model"), f"the export is not recognised as altjax's: {names}"
    assert not [n for n in objects(store) if n.startswith(".")], f"temporary directories left: {objects(store)}"

    with pytest.raises(directories.CheckpointError, match="output path exists"):
        model.save_pretrained(f"{RUN}/model")
    with pytest.raises(directories.CheckpointError, match="contains the source"):
        model.save_pretrained(RUN, overwrite=True)
    epath.Path("gs://bucket/user/notes.txt").write_text("mine")
    with pytest.raises(directories.CheckpointError, match=r"not an output altjax wrote \(it holds notes.txt\)"):
        model.save_pretrained("gs://bucket/user", overwrite=True)
    assert objects(store, "gs://bucket/user") == ["notes.txt"], "a refused export changed the directory"

    for fmt in ("hf", "altjax"):
        model.save_pretrained(f"{RUN}/model", format=fmt, overwrite=True)
        names = objects(store, f"{RUN}/model")
        kind = "model.safetensors" if fmt == "hf" else "params/"
        assert any(n.startswith(kind) for n in names) and directories.is_altjax_output(f"{RUN}/model"), \
            f"format={fmt}: {names}"
        local = tmp_path / f"back-{fmt}"
        download(f"{RUN}/model", local)
        loaded = engine.model_params(CLIPModel.from_pretrained(local))
        differ = sorted(set(loaded) ^ set(expected))
        assert not differ, f"format={fmt}: parameter sets differ: {differ}"
        for key, value in expected.items():
            np.testing.assert_array_equal(loaded[key], value, err_msg=f"format={fmt}: {key} changed through gs://")
    assert not [n for n in objects(store) if n.startswith(".")], f"temporary directories left: {objects(store)}"
