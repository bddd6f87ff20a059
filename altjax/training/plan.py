"""``altjax-train --dry-run``: the plan of a run, compiled but not run.

:func:`plan` builds the run of a config abstractly (the train state's shapes and shardings, through
the loop's own :func:`~altjax.training.loop.build_run` under ``jax.eval_shape``: no parameter is
initialised or loaded), lowers and compiles the loop's train step
(:func:`~altjax.training.loop.build_step`) for the current devices, and reads what XLA says of it:
the bytes of the step's arguments, outputs and temporaries on one device, and its FLOPs. With the
train state's bytes per device (from its shardings) and the batch layout, :func:`format_plan` makes
the table ``altjax-train --dry-run`` prints. On a CPU with simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) it answers "will this config fit on N
devices" before a pod is reserved.

The batch's shapes come from one small batch of the task's own pipeline (one example per device,
whatever the global batch), so the data must be readable; nothing is written to the workdir.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from altjax import sharding
from altjax.training import tasks
from altjax.training.config import validate
from altjax.training.loop import build_run, build_step

log = logging.getLogger("altjax.train")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A compiled but unrun step. Bytes are per device (the largest over the devices where they
    differ); ``flops`` is one step's on one device, as XLA counts them."""

    task: str
    platform: str
    devices: int
    mesh: dict[str, int]
    global_batch: int
    per_device_batch: int
    accum_steps: int
    params_bytes: int          # trained parameters
    frozen_bytes: int          # frozen parameters (no gradient, no optimiser state)
    opt_bytes: int             # optimiser state
    other_bytes: int           # BatchNorm statistics, dropout keys and counters, the step counter
    batch_bytes: int
    argument_bytes: int        # XLA: the step's inputs (state + batch)
    output_bytes: int          # XLA: the new state and the metrics
    alias_bytes: int           # XLA: outputs written over donated inputs
    temp_bytes: int            # XLA: activations, gradients and other temporaries
    code_bytes: int
    flops: Optional[float]
    memory_limit: Optional[int]  # what one device has, where it says
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """What the step holds at its peak on one device: inputs, outputs not written over a
        donated input, and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes



def abstract_run(config, directory: str, mesh):
    """``(parts, state, shardings)`` of a fresh run of ``config`` built without computing anything:
    the train state as ``jax.ShapeDtypeStruct``s carrying their shardings (``shardings``)."""
    built = {}

    def fresh():
        # The parts hold no arrays (a graphdef, an optax transformation, the objective, the
        # processor): they are kept from the trace; the state comes out as shapes.
        built["parts"], state = build_run(config, directory, mesh)
        return state

    shapes = jax.eval_shape(fresh)
    shardings = sharding.state_shardings(shapes, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return built["parts"], state, shardings

def _itemsize(leaf) -> int:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        # A typed PRNG key (the dropout streams) is stored as its key data, e.g. two uint32 words.
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), leaf.dtype))
        return math.prod(data.shape) * np.dtype(data.dtype).itemsize
    return np.dtype(leaf.dtype).itemsize


def device_bytes(tree) -> int:
    """The bytes that the most loaded device holds of ``tree`` (arrays or ``ShapeDtypeStruct``s
    with shardings), from each leaf's shard on each device."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        itemsize = _itemsize(leaf)
        for device, index in leaf.sharding.devices_indices_map(tuple(leaf.shape)).items():
            size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
            totals[device] = totals.get(device, 0) + size * itemsize
    return max(totals.values(), default=0)


def batch_spec(config: ml_collections.ConfigDict, processor, directory: str, mesh) -> dict:
    """``ShapeDtypeStruct``s of one global batch, sharded as the loop shards it: the task's pipeline
    gives one example per device (a global batch of thousands of images would cost real memory
    here), whose per-example shapes and dtypes the whole batch shares."""
    small = ml_collections.ConfigDict(config.to_dict())
    small.batch_size = sharding.batch_size_divisor(mesh)
    # One example per device; the first rows of the global order are enough for the shapes.
    rows = np.arange(small.batch_size)[sharding.process_batch_rows(mesh, small.batch_size)]
    pipeline = tasks.TASKS[config.task].pipeline(small, processor, directory, rows)
    try:
        example = next(pipeline)
    finally:
        pipeline.close()
    layout = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((int(config.batch_size),) + np.shape(v)[1:], np.asarray(v).dtype, sharding=layout)
            for k, v in example.items()}


def plan(config: ml_collections.ConfigDict) -> Plan:
    """Checks ``config`` as a run does (raises ConfigError, logs warnings), builds its train state abstractly and
    compiles its step for the current devices; writes nothing but a temporary directory (the
    processor's files, removed again)."""
    for warning in validate(config):
        log.warning("%s", warning)
    mesh = sharding.make_mesh(**config.mesh)
    staging = tempfile.mkdtemp(prefix="altjax-plan-")
    try:
        parts, state, shardings = abstract_run(config, staging, mesh)
        batch = batch_spec(config, parts.processor, staging, mesh)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    compiled = build_step(config, parts, mesh, shardings).lower(state, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    # Older JAX versions give one dict per computation, newer ones the dict itself.
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    stats = jax.local_devices()[0].memory_stats() or {}
    global_batch, divisor = int(config.batch_size), sharding.batch_size_divisor(mesh)
    return Plan(
        task=config.task, platform=jax.devices()[0].platform, devices=jax.device_count(), mesh=dict(mesh.shape),
        global_batch=global_batch, per_device_batch=global_batch // divisor,
        accum_steps=int(config.grad_accum_steps),
        params_bytes=device_bytes(state["params"]), frozen_bytes=device_bytes(state["frozen"]),
        opt_bytes=device_bytes(state["opt"]), other_bytes=device_bytes((state["rest"], state["step"])),
        batch_bytes=device_bytes(batch),
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes), flops=flops,
        memory_limit=stats.get("bytes_limit"), compile_seconds=seconds)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_plan(p: Plan) -> str:
    """The table ``altjax-train --dry-run`` prints."""
    mesh = " x ".join(f"{name} {size}" for name, size in p.mesh.items())
    micro = p.per_device_batch // p.accum_steps
    rows = [
        ("trained parameters", p.params_bytes),
        ("frozen parameters", p.frozen_bytes),
        ("optimizer state", p.opt_bytes),
        ("other state (BatchNorm, dropout keys)", p.other_bytes),
        ("batch", p.batch_bytes),
        ("step inputs (state + batch)", p.argument_bytes),
        ("step outputs", p.output_bytes),
        ("  of which over donated inputs", p.alias_bytes),
        ("temporaries (activations, gradients)", p.temp_bytes),
        ("peak (inputs + new outputs + temporaries)", p.peak_bytes),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"dry run: task {p.task}, {p.devices} {p.platform} device(s), mesh {mesh}, step compiled in "
             f"{p.compile_seconds:.1f} s",
             f"batch: global {p.global_batch}, {p.per_device_batch} per device, gradient accumulation "
             f"{p.accum_steps} ({micro} per device per micro-batch)",
             "",
             f"{'per device':<{width}}  {'bytes':>15}  {'':>11}"]
    lines += [f"{name:<{width}}  {value:>15,}  {human_bytes(value):>11}" for name, value in rows]
    lines.append("")
    if p.flops is None:
        lines.append("FLOPs per step: not reported by this backend")
    else:
        lines.append(f"FLOPs per step: {p.flops:.3e} per device, {p.flops * p.devices:.3e} on all {p.devices}")
    if p.memory_limit:
        verdict = "fits" if p.peak_bytes <= p.memory_limit else "does NOT fit"
        lines.append(f"device memory: {human_bytes(p.memory_limit)}; the peak {verdict}")
    else:
        lines.append(f"device memory: not reported by {p.platform}; compare the peak with the target device's")
    return "\n".join(lines)
