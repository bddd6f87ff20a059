"""A training task: the few functions that make a kind of run out of the generic loop.

``altjax-train`` runs the task that ``config.task`` names (:mod:`altjax.training.tasks`). The loop
and the step know no model: everything specific to one (which model and processor, which
examples, which loss, what is exported) is asked of the task, which reads its own part of the
config. Remat, freezing, bf16, gradient accumulation, the SigLIP bias, checkpoints and evaluations
are the loop's and work for every task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx
from jax.sharding import Mesh

from altjax.training.checks import Checker
from altjax.training.objectives import Objective


def unchanged(model: nnx.Module) -> nnx.Module:
    """The export of a task that trains the model it exports."""
    return model


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training run.

    ``name``: what ``config.task`` says to pick it.
    ``check(checker)``: records every problem of the task's part of the config
    (:class:`~altjax.training.checks.Checker`), before anything is built.
    ``build(config, directory, mesh) -> (model, processor)``: the model to train, initialised (or
    loaded) into ``mesh``, and the processor of what it exports, saved in ``directory`` (with any
    other file the pipeline needs, e.g. a teacher's tokenizer).
    ``pipeline(config, processor, directory, rows)``: this process's resumable input pipeline
    (``next``, ``get_state``, ``set_state``, ``epoch``, ``close``), giving the batches the
    objective reads: of each global batch of ``config.batch_size`` examples in the data's global
    order (:mod:`altjax.data.order`), the positions ``rows`` (an int array), in that order. Its
    state (``epoch``, ``batch``: global batches of the epoch consumed, ``skipped``) must not
    depend on ``rows``, so that a checkpoint resumes on another topology.
    ``objective(config) -> Objective``: the loss and metrics of a batch.
    ``export(model)``: the part of the trained model that is evaluated and saved to ``model/`` (by
    its ``save_pretrained``; the evaluations call it as ``altjax-eval`` does).
    """

    name: str
    check: Callable[[Checker], None]
    build: Callable[[Any, str, Mesh], tuple[nnx.Module, Any]]
    pipeline: Callable[[Any, Any, str, Any], Any]
    objective: Callable[[Any], Objective]
    export: Callable[[nnx.Module], nnx.Module] = unchanged
