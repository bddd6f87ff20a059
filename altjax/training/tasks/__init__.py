"""The training tasks by name: ``config.task`` picks one (:class:`~altjax.training.tasks.base.Task`).

``"align"``                ALIGN contrastive (:mod:`altjax.training.tasks.align`)
``"clip"``                 CLIP contrastive (:mod:`altjax.training.tasks.clip`)
``"altclip_distill"``      AltCLIP phase 1, teacher learning (:mod:`altjax.training.tasks.altclip`)
``"altclip_contrastive"``  AltCLIP phase 2, contrastive learning (:mod:`altjax.training.tasks.altclip`)

A new task is a module defining a ``Task`` and one :func:`register` call (or a line in
:data:`TASKS` for one shipped with altjax).
"""
from __future__ import annotations

from altjax.training.tasks import align, altclip, clip
from altjax.training.tasks.base import Task

TASKS: dict[str, Task] = {task.name: task for task in (align.TASK, clip.TASK, altclip.DISTILL, altclip.CONTRASTIVE)}


def register(task: Task) -> None:
    """Makes ``task`` available to configs as ``config.task = task.name`` (replacing one of that name)."""
    TASKS[task.name] = task
