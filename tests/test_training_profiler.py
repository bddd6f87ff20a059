"""``config.profile``: a jax.profiler trace of a step range, in TensorBoard's profile-plugin layout,
stopped after the range or when the run ends or fails inside it."""
import glob
import logging
import os

import jax
import jax.numpy as jnp
import pytest

from altjax import train
from altjax.training.profiler import PROFILE_DIR, StepProfiler


@jax.jit
def tiny_step(x):
    return jnp.tanh(x @ x.T).sum(axis=0)


def _run(profiler, steps, *, fail_at=None):
    """Steps 1..steps as the training loop calls the hooks, failing inside step ``fail_at``."""
    x = jnp.ones((8, 8))
    with profiler:
        for step in range(1, steps + 1):
            profiler.before_step(step)
            x = tiny_step(x)[None, :].repeat(8, axis=0)
            if step == fail_at:
                raise RuntimeError(f"step {step} failed")
            profiler.after_step(step, x)


def _traces(directory):
    return sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.xplane.pb")))


def test_a_step_range_is_traced_into_the_profile_plugin_layout(tmp_path):
    directory = str(tmp_path / PROFILE_DIR)
    profiler = StepProfiler(directory, start_step=2, num_steps=2)
    _run(profiler, 5)
    traces = _traces(directory)
    assert len(traces) == 1, f"expected one <dir>/plugins/profile/<run>/<host>.xplane.pb, found {traces}"
    assert profiler.traced == [2, 3], f"traced steps {profiler.traced}, expected [2, 3]"
    assert not profiler.active, "the trace is still running after its last step"
    assert b"tiny_step" in open(traces[0], "rb").read(), "the trace does not hold the jitted step"


def test_a_run_that_fails_inside_the_range_leaves_a_trace_and_no_trace_running(tmp_path):
    directory = str(tmp_path / PROFILE_DIR)
    profiler = StepProfiler(directory, start_step=1, num_steps=10)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        _run(profiler, 5, fail_at=3)
    assert len(_traces(directory)) == 1, f"no trace written by a failed run: {os.listdir(tmp_path)}"
    assert profiler.traced == [1, 2], f"traced steps {profiler.traced}, expected [1, 2]"
    # The profiler session was stopped: another trace can start.
    jax.profiler.start_trace(str(tmp_path / "next"))
    jax.profiler.stop_trace()


def test_a_run_that_ends_inside_the_range_stops_the_trace(tmp_path):
    directory = str(tmp_path / PROFILE_DIR)
    profiler = StepProfiler(directory, start_step=2, num_steps=100)
    _run(profiler, 3)
    assert len(_traces(directory)) == 1 and profiler.traced == [2, 3], (
        f"traces {_traces(directory)}, traced steps {profiler.traced}")


def test_a_resumed_run_traces_what_is_left_of_the_range(tmp_path):
    directory = str(tmp_path / PROFILE_DIR)
    profiler = StepProfiler(directory, start_step=2, num_steps=3)
    x = jnp.ones((8, 8))
    with profiler:
        for step in (4, 5, 6):  # restored at step 3
            profiler.before_step(step)
            x = tiny_step(x)[None, :].repeat(8, axis=0)
            profiler.after_step(step, x)
    assert profiler.traced == [4], f"traced steps {profiler.traced}, expected [4]"


@pytest.mark.parametrize("start_step, enabled", [(0, True), (3, False)])
def test_off_or_off_process_0_traces_nothing(tmp_path, start_step, enabled):
    directory = str(tmp_path / PROFILE_DIR)
    _run(StepProfiler(directory, start_step=start_step, num_steps=2, enabled=enabled), 4)
    assert not os.path.exists(directory), f"{directory} written with start_step={start_step}, enabled={enabled}"


def test_a_trace_that_cannot_start_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    jax.profiler.start_trace(str(tmp_path / "someone-else"))
    try:
        profiler = StepProfiler(str(tmp_path / PROFILE_DIR), start_step=1, num_steps=2)
        with caplog.at_level(logging.WARNING, logger="altjax.train"):
            _run(profiler, 3)
    finally:
        jax.profiler.stop_trace()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot start a trace" in warnings[0], f"warnings {warnings}"
    assert profiler.traced == [], f"traced steps {profiler.traced} while another trace ran"


@pytest.mark.parametrize("recipe", train.recipes())
def test_the_recipes_have_profiling_off(recipe, tmp_path):
    config = train.load_config(recipe, ["profile.start_step=7", "profile.num_steps=2"])
    profiler = StepProfiler.from_config(config, str(tmp_path))
    assert (profiler.directory, profiler.first, profiler.last) == (str(tmp_path / PROFILE_DIR), 7, 8), (
        f"{recipe}: profile overrides read as {profiler.directory}, steps {profiler.first}..{profiler.last}")
    default = train.load_config(recipe).profile
    assert (default.start_step, default.num_steps) == (0, 3), f"{recipe}: profile defaults {default}"
