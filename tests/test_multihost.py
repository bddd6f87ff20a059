"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) give the same
losses, gradients and training step as this single process with 8 devices, to 5e-6 relative."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from altjax.sharding import make_mesh
from tests import multihost_worker
from tests.helpers import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
TIMEOUT_S = 150
RTOL = 5e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    procs, outputs, logs = [], [], []
    for process_id in range(NUM_PROCESSES):
        outputs.append(tmp_path / f"process{process_id}.npz")
        # Files, not pipes: a process blocked on a full pipe would stall the other's collectives.
        logs.append(tmp_path / f"process{process_id}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(process_id),
                 str(NUM_PROCESSES), str(port), str(outputs[-1])],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def report():
        return "\n".join(f"--- process {i} (exit code {p.returncode}) output:\n{log.read_text()[-4000:]}"
                         for i, (p, log) in enumerate(zip(procs, logs)))

    assert not timed_out, f"the {NUM_PROCESSES} processes did not finish within {TIMEOUT_S} s\n{report()}"
    assert all(p.returncode == 0 for p in procs), f"a process failed\n{report()}"
    return [dict(np.load(out)) for out in outputs]


def test_two_processes_match_one_process(tmp_path):
    per_process = _run_processes(tmp_path)
    reference = multihost_worker.compute(make_mesh(data=-1, devices=jax.devices()[:8]))
    for process_id, got in enumerate(per_process):
        assert int(got.pop("process_count")) == NUM_PROCESSES, f"process {process_id}: wrong process count"
        assert int(got.pop("global_devices")) == NUM_PROCESSES * DEVICES_PER_PROCESS, \
            f"process {process_id}: wrong global device count"
        assert sorted(got) == sorted(reference), \
            f"process {process_id}: outputs {sorted(set(got) ^ set(reference))} differ in presence"
        for name, ref in reference.items():
            assert_rel_close(got[name], ref, rtol=RTOL, what=f"process {process_id}: {name}")
