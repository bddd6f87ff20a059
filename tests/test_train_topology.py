"""altjax-train on several processes (jax.distributed on 127.0.0.1, simulated CPU devices): the same
run on any topology, a checkpoint resumed on another topology, and a killed process ending its peer.

The tiny ALIGN of test_train.py (dropout, drop-connect, damaged records) runs 8 steps, saving every 4.
Every run is bounded in time; a process that overstays is killed and its output shown.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from altjax import AlignModel, train
from tests.test_train import DEMO, cli_env, data, jax_cache, overrides  # noqa: F401 - data is a fixture

STEPS = ["total_steps=8"]
PEER_TIMEOUT_S = 5
RUN_TIMEOUT_S = 300
# Float32 reduction order is the only difference between topologies (measured: 1.3e-7).
TOPOLOGY_RTOL = 1e-5
RESUME_RTOL = 1e-4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """``processes`` x ``devices`` altjax-train processes on ``workdir``, their output in files."""

    def __init__(self, workdir, data, cache, processes: int, devices: int, *extra: str):
        self.workdir, self.logs = workdir, [f"{workdir}.process{i}.log" for i in range(processes)]
        env = dict(cli_env(cache), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        port = _port()
        self.procs = []
        for i, log in enumerate(self.logs):
            cmd = [sys.executable, "-m", "altjax.train", "--config", DEMO, "--workdir", str(workdir)]
            if processes > 1:
                cmd += ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                        str(processes), "--process-id", str(i)]
            cmd += [f"--config.{o}" for o in overrides(data, *STEPS, f"peer_timeout_s={PEER_TIMEOUT_S}", *extra)]
            # Files, not pipes: a process blocked on a full pipe would stall its peers' collectives.
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def report(self) -> str:
        return "\n".join(f"--- process {i} (exit status {p.returncode}):\n{self.output(i)[-3000:]}"
                         for i, p in enumerate(self.procs))

    def wait(self, timeout: float = RUN_TIMEOUT_S, codes=None) -> "Run":
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within {timeout} s\n{self.report()}") from None
        want = [0] * len(self.procs) if codes is None else codes
        assert [p.returncode for p in self.procs] == want, f"exit statuses, expected {want}\n{self.report()}"
        return self

    def kill_after_checkpoint(self, step: int, victim: int) -> float:
        """SIGKILLs process ``victim`` once checkpoint ``step`` is complete; returns the time."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not os.path.isdir(os.path.join(self.workdir, "checkpoints", str(step))):
            running = [p.poll() is None for p in self.procs]
            assert all(running) and time.monotonic() < deadline, \
                f"checkpoint {step} never appeared (running: {running})\n{self.report()}"
            time.sleep(0.02)
        self.procs[victim].send_signal(signal.SIGKILL)
        return time.monotonic()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def losses(workdir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in train.read_metrics(str(workdir))]


def assert_close_losses(workdir, reference, rtol: float, what: str) -> None:
    got, want = losses(workdir), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want], f"{what}: steps logged {[s for s, _ in got]}"
    worst = max((abs(a - b) / abs(b), s, a, b) for (s, a), (_, b) in zip(got, want))
    assert worst[0] <= rtol, (f"{what}: step {worst[1]} loss {worst[2]!r} vs {worst[3]!r} on one process, "
                              f"relative difference {worst[0]:.2e} > {rtol:g}")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):  # noqa: F811 - data is the fixture imported above
    """The reference: one process with 4 devices, uninterrupted."""
    workdir = tmp_path_factory.mktemp("topology") / "1x4"
    Run(workdir, data, jax_cache(tmp_path_factory), 1, 4).wait()
    return workdir


def test_two_processes_train_exactly_as_one(single, data, tmp_path, tmp_path_factory):  # noqa: F811
    workdir = tmp_path / "2x2"
    run = Run(workdir, data, jax_cache(tmp_path_factory), 2, 2).wait()
    assert_close_losses(workdir, single, TOPOLOGY_RTOL, "2 processes x 2 devices vs 1 x 4, dropout on")
    skipped = [r["skipped_examples"] for r in train.read_metrics(str(workdir))]
    want = [r["skipped_examples"] for r in train.read_metrics(str(single))]
    assert skipped == want, f"skipped records per step {skipped} vs {want} on one process"
    for i in range(2):
        assert "Traceback" not in run.output(i) and "Check failure" not in run.output(i), run.report()

    # Process 0 alone writes the exported model, gathered from both processes' shards.
    ours, theirs = (nnx.to_flat_state(nnx.state(AlignModel.from_pretrained(w / "model"), nnx.Param))
                    for w in (workdir, single))
    worst = max((float(np.abs(np.asarray(a[...]) - np.asarray(b[...])).max()), k) for (k, a), (_, b) in zip(ours, theirs))
    assert worst[0] < 1e-5, f"exported parameter {worst[1]} differs from the one-process run's by {worst[0]:.2e}"


def test_a_checkpoint_resumes_on_more_processes(single, data, tmp_path, tmp_path_factory):  # noqa: F811
    cache = jax_cache(tmp_path_factory)
    workdir = tmp_path / "1x4-then-2x2"
    first = Run(workdir, data, cache, 1, 4)
    first.kill_after_checkpoint(4, victim=0)
    first.wait(codes=[-signal.SIGKILL])
    Run(workdir, data, cache, 2, 2).wait()
    assert "resumed from" in open(f"{workdir}.process0.log").read()
    assert_close_losses(workdir, single, RESUME_RTOL, "1 x 4 killed after step 4, resumed as 2 x 2")


def test_a_killed_process_ends_its_peer_and_the_run_resumes_on_fewer_devices(single, data, tmp_path,  # noqa: F811
                                                                            tmp_path_factory):
    cache = jax_cache(tmp_path_factory)
    workdir = tmp_path / "2x2-then-1x2"
    run = Run(workdir, data, cache, 2, 2)
    killed = run.kill_after_checkpoint(4, victim=1)
    run.wait(timeout=PEER_TIMEOUT_S + 60, codes=[1, -signal.SIGKILL])
    took = time.monotonic() - killed
    out = run.output(0)
    errors = [line for line in out.splitlines() if line.startswith("altjax-train: error: ")]
    assert len(errors) == 1 and "process 1 of 2" in errors[0] and "checkpoint is step" in errors[0], run.report()
    assert "Traceback" not in out and "Check failure" not in out, run.report()
    # Measured here: 5-7 s with a 5 s timeout; the margin is for a loaded CI machine.
    assert took < PEER_TIMEOUT_S + 20, f"process 0 took {took:.1f} s to end after process 1 was killed"

    Run(workdir, data, cache, 1, 2).wait()
    assert_close_losses(workdir, single, RESUME_RTOL, "2 x 2 with a process killed after step 4, resumed as 1 x 2")


def test_resume_data_state_is_global_and_refuses_another_stream(caplog):
    from altjax.training.checkpoints import IncompatibleCheckpoint
    from altjax.training.loop import resume_data_state

    current = {"epoch": 0, "batch": 0, "skipped": 0, "seed": 0, "batch_size": 8, "num_records": 64}
    saved = dict(current, epoch=2, batch=3, skipped=5)
    got = resume_data_state(saved, current, 8, "ckpt", 40)
    assert (got["epoch"], got["batch"], got["skipped"]) == (2, 3, 5), f"resumed at {got}"
    with pytest.raises(IncompatibleCheckpoint, match="batch_size=8, this run has batch_size=16"):
        resume_data_state(saved, dict(current, batch_size=16), 16, "ckpt", 40)
    # An earlier altjax saved one position per process (records of its share consumed).
    legacy = [{"epoch": 1, "position": 12, "skipped": 1, "process_index": i, "process_count": 2} for i in range(2)]
    got = resume_data_state(legacy, current, 8, "ckpt", 40)
    assert (got["epoch"], got["batch"], got["skipped"]) == (1, 3, 2), f"legacy state resumed at {got}"
    assert any("earlier altjax" in r.getMessage() for r in caplog.records), "no warning for a legacy input state"
