"""Training: the loop, the step, objectives, optimisers, train-state checkpoints, configs and logs,
and the tasks (one file each) that say what a run trains.

* :mod:`altjax.training.loop`: :func:`~altjax.training.loop.train`, one run in its workdir, resumable.
* :mod:`altjax.training.step`: the jitted step, a pure function of the sharded train state.
* :mod:`altjax.training.objectives`: what a step minimises (contrastive, regression), remat per tower.
* :mod:`altjax.training.optim`: LAMB / AdamW, schedules, weight-decay masks, freezing.
* :mod:`altjax.training.checkpoints`: orbax checkpoints of the train state.
* :mod:`altjax.training.config`: recipes, config files and overrides; :mod:`~altjax.training.checks`
  every value checked before a run.
* :mod:`altjax.training.logs`: ``metrics.jsonl`` and ``evals.jsonl``.
* :mod:`altjax.training.tasks`: ``config.task`` -> build, pipeline, objective, export.
"""
