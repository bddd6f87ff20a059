"""A ``jax.profiler`` trace of a range of training steps, for TensorBoard's profile plugin.

``config.profile.start_step`` is the first step traced, numbered as the logs number steps (the
first step of a run is 1); 0 traces nothing (the recipes' default). ``config.profile.num_steps``
steps are traced from there. The trace goes to ``<workdir>/profile/plugins/profile/<run>/``
(``<host>.xplane.pb``, what ``jax.profiler.start_trace`` writes): ``tensorboard --logdir
<workdir>`` shows it as the run ``profile`` in its Profile tab. Skip the first steps (compilation;
step 1 compiles the step function) unless compilation is what you want to see, e.g.
``--config.profile.start_step=10 --config.profile.num_steps=3``.

Only process 0 traces: every process runs the same program on its own devices, so one host's
trace shows the step, and tracing every host would slow each of them and multiply the files
(a straggling host is found in the step times first). A resumed run traces what is left of the
range after its restored step. The trace is stopped after the last step of the range, or by
:meth:`StepProfiler.close` when the run ends or fails before that, so a failed run still leaves a
complete trace of the steps it ran. A trace that cannot be started or stopped (e.g. another
trace is running in the process) is a warning: the run goes on without it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax

from altjax.console import echo

log = logging.getLogger("altjax.train")

PROFILE_DIR = "profile"


class StepProfiler:
    """Traces steps ``start_step`` .. ``start_step + num_steps - 1`` into ``directory`` (nothing when
    ``start_step`` is 0 or ``enabled`` is false). The loop calls :meth:`before_step` with the number
    of the step it is about to run, :meth:`after_step` with the number of the step it ran and its
    outputs (waited for before the trace stops, so that it holds the last step's device work), and
    :meth:`close` when it leaves, however it leaves; also a context manager that closes."""

    def __init__(self, directory: str, start_step: int, num_steps: int, *, enabled: bool = True):
        self.directory = directory
        self.first, self.last = int(start_step), int(start_step) + int(num_steps) - 1
        self.enabled = enabled and self.first > 0
        self.active = False
        self.traced: list[int] = []

    def before_step(self, step: int) -> None:
        if self.enabled and not self.active and self.first <= step <= self.last:
            try:
                jax.profiler.start_trace(self.directory)
            except Exception as e:  # noqa: BLE001 - a diagnostic must not end the run
                log.warning("profile: cannot start a trace in %s (%s); training goes on without it", self.directory, e)
                self.enabled = False
                return
            self.active = True
            log.info("profile: tracing from step %d (to step %d at the most) into %s", step, self.last, self.directory)

    def after_step(self, step: int, outputs: Any = None) -> None:
        if not self.active:
            return
        self.traced.append(step)
        if step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops the trace if one is running (it is written then); the profiler traces no more."""
        self.enabled = False
        if not self.active:
            return
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as e:  # noqa: BLE001 - as in before_step; close also runs while a failure unwinds
            log.warning("profile: the trace of steps %s could not be written (%s)", self.traced, e)
            return
        echo(f"profile: traced step{'s' if len(self.traced) > 1 else ''} {', '.join(map(str, self.traced))} into "
             f"{self.directory} (tensorboard --logdir {os.path.dirname(self.directory)}, Profile tab)")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_config(cls, config, workdir: str) -> "StepProfiler":
        """The profiler of a run: ``config.profile``, into ``<workdir>/profile``, on process 0."""
        return cls(os.path.join(workdir, PROFILE_DIR), int(config.profile.start_step), int(config.profile.num_steps),
                   enabled=jax.process_index() == 0)
