"""The workdir of a run: only altjax's or new ones are used, one run at a time (a killed run's lock
never blocks its resume), and a resume must compute the same run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from altjax import workdir as workdirs


def test_new_empty_and_altjax_workdirs_are_usable(tmp_path):
    workdirs.check_usable(str(tmp_path / "new"))
    workdirs.check_usable(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(
        {"total_steps": 1, "batch_size": 8, "model": {}, "data": {}, "optimizer": {}}))
    (tmp_path / "metrics.jsonl").write_text("")
    workdirs.check_usable(str(tmp_path))


def test_files_and_foreign_directories_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(workdirs.WorkdirError, match=r"holds files altjax did not write \(notes.txt\)"):
        workdirs.check_usable(str(tmp_path))
    with pytest.raises(workdirs.WorkdirError, match="is a file, not a directory"):
        workdirs.check_usable(str(tmp_path / "notes.txt"))
    with pytest.raises(workdirs.WorkdirError, match="is a file; give a path in a directory"):
        workdirs.check_usable(str(tmp_path / "notes.txt" / "run"))
    # A config.json of something else (an HF model directory) is not a workdir.
    (tmp_path / "config.json").write_text('{"model_type": "align"}')
    with pytest.raises(workdirs.WorkdirError, match="holds files altjax did not write"):
        workdirs.check_usable(str(tmp_path))


HOLD = textwrap.dedent("""
    import sys, time
    from altjax import workdir
    lock = workdir.RunLock(sys.argv[1])
    lock.acquire()
    lock.record()
    print("locked", flush=True)
    time.sleep(60)
""")


def hold_lock(path):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked", "the holder process did not take the lock"
    return process


def test_a_second_run_is_refused_with_the_holder_named(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(workdirs.WorkdirError) as info:
            workdirs.RunLock(str(tmp_path)).acquire()
        assert time.monotonic() - start < 5, "refusing took longer than a few seconds"
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "another run is training in it" in message, message
        assert "started 20" in message and "host " in message, message
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_killed_holder_never_blocks_the_resume(tmp_path):
    holder = hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / workdirs.LOCK_FILE).exists(), "the killed run's lock file should still be there"
    lock = workdirs.RunLock(str(tmp_path))
    lock.acquire()  # the kernel released the killed holder's lock: no staleness to guess
    lock.record()
    assert f'"pid": {os.getpid()}' in (tmp_path / workdirs.LOCK_FILE).read_text()
    lock.release()


def test_a_refused_lock_leaves_the_lock_file_as_it_was(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        before = (tmp_path / workdirs.LOCK_FILE).read_bytes()
        with pytest.raises(workdirs.WorkdirError):
            workdirs.RunLock(str(tmp_path)).acquire()
        assert (tmp_path / workdirs.LOCK_FILE).read_bytes() == before
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_resume_compatibility_separates_schedule_from_substance():
    saved = {"total_steps": 100, "batch_size": 64, "log_every": 10, "model": {"preset": "align-tiny", "text": {"x": [1, 2]}},
             "optimizer": {"learning_rate": 0.01, "name": "lamb"}, "eval": {"batch_size": 10}}
    current = json.loads(json.dumps(saved))
    current.update(total_steps=200, log_every=5, batch_size=32)
    current["model"]["text"] = {"x": (1, 2)}
    current["optimizer"]["learning_rate"] = 0.005
    current["optimizer"]["name"] = "adamw"
    current["eval"]["batch_size"] = 20
    blocking, allowed = workdirs.compare_configs(saved, current)
    assert blocking == ["batch_size: 64 -> 32", 'optimizer.name: "lamb" -> "adamw"'], blocking
    assert allowed == ["eval.batch_size: 10 -> 20", "log_every: 10 -> 5", "optimizer.learning_rate: 0.01 -> 0.005",
                       "total_steps: 100 -> 200"], allowed


def test_local_workdirs_are_made_absolute_and_remote_ones_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert workdirs.absolute("run") == str(tmp_path / "run")
    assert workdirs.absolute(tmp_path / "a" / ".." / "run") == str(tmp_path / "run")
    # A URI is never joined to the working directory (tests/test_workdir_remote.py covers its I/O).
    assert workdirs.absolute("gs://bucket/run/") == "gs://bucket/run"
    assert workdirs.absolute("gs:/bucket/run") == str(tmp_path / "gs:" / "bucket" / "run"), "a local path, not a URI"
