"""``altjax-train``: the command line of the training loop, and the names scripts and notebooks train with.

    altjax-train --config demo --workdir DIR [--config.key=value ...]
    altjax-train --config configs/altclip_distill.py --workdir DIR --config.distill.teacher=CLIP_DIR
    altjax-train --config my_sweep.py:small --workdir DIR        # get_config("small")
    altjax-train --config align_base --workdir DIR --dry-run     # compile only: memory, FLOPs, batch layout

``--config`` is a recipe shipped with altjax (``demo``, ``align_base``, ``altclip_distill``,
``altclip_contrastive``: the repository's ``configs/``) or a Python file whose ``get_config()``
returns an ``ml_collections.ConfigDict``; ``FILE:ARG`` passes ``ARG`` to ``get_config``. Each
``--config.a.b=value`` overrides one entry (:mod:`altjax.training.config`). ``config.task`` names
what is trained (:mod:`altjax.training.tasks`); the run itself is :func:`train`
(:mod:`altjax.training.loop`: what the workdir receives, resuming, signals).

A user's mistake (a config value, a workdir, a checkpoint that does not fit) is one line
``altjax-train: error: ...`` and exit status 2, before anything is written; a run that cannot go on
(diverged, a failed save, no usable checkpoint, full storage) is one line and status 1. A run that
ends prints a last line on stdout naming its model (:func:`model_line`).

The libraries under altjax (tfds, absl, orbax, transformers) keep their INFO and WARNING messages
to themselves unless ``--verbose`` is given (:func:`altjax.console.quiet_third_party`).

Multi-host: ``--distributed`` calls ``jax.distributed.initialize()`` first (with
``--coordinator-address``, ``--num-processes`` and ``--process-id`` where JAX cannot find them in
the environment, and JAX's recoverability on: :mod:`altjax.training.peers`); every process then
loads its own rows of each global batch. The run computes the same on any topology and resumes on
any other; a process that dies or fails alone ends the others within ``config.peer_timeout_s``
with one line and status 1.

``--print-config`` prints the config with its overrides applied (every key) and exits 0.
``--dry-run`` checks the config as a run does, compiles its step for the current devices and prints
the bytes per device (parameters, optimiser state, temporaries), the FLOPs of a step and the batch
layout, then exits 0 without touching the workdir (:mod:`altjax.training.plan`).

From Python: ``train(load_config("demo", ["total_steps=100"]), workdir)``, then
``read_metrics(workdir)`` and ``read_evals(workdir)``.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from typing import Optional, Sequence

import jax

from altjax import console
from altjax import workdir as workdirs
from altjax.evaluation.datasets import DatasetError
from altjax.model_io.directories import CheckpointError
from altjax.models import registry
from altjax.training.checkpoints import CheckpointSaveFailed, IncompatibleCheckpoint, NoUsableCheckpoint
from altjax.training.checks import ConfigError
from altjax.training.config import CONFIGS_DIR, apply_override, load_config, recipes
from altjax.training.logs import MetricsLog, read_evals, read_metrics
from altjax.training.loop import EXPORT_DIR, SIGINT_EXIT, SIGTERM_EXIT, ChanceWatch, TrainingDiverged, train
from altjax.training import peers, tasks
from altjax.training.plan import format_plan, plan

__all__ = ["CONFIGS_DIR", "EXIT_CODES", "EXPORT_DIR", "ChanceWatch", "ConfigError", "MetricsLog", "SIGINT_EXIT",
           "SIGTERM_EXIT", "TrainingDiverged", "apply_override", "load_config", "main", "model_line", "read_evals",
           "read_metrics", "recipes", "report", "train"]

# Errors a command reports in one line: a user's mistake (exit status 2), or a run that cannot go on
# (1). Anything else is altjax's own bug and keeps its traceback.
USER_ERRORS = (ConfigError, workdirs.WorkdirError, IncompatibleCheckpoint, CheckpointError,
               DatasetError)
RUN_FAILURES = (TrainingDiverged, NoUsableCheckpoint, CheckpointSaveFailed)


# Storage that fails under a run (full, over quota, read-only) is not altjax's bug: one line too.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def report(prog: str, error: Exception) -> int:
    """Prints ``prog: error: ...`` for one of :data:`USER_ERRORS` / :data:`RUN_FAILURES` and
    returns its exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, USER_ERRORS) else 1


def model_line(prog: str, path: str) -> str:
    """The last line of a command that trained a model: where the model is and how to use it."""
    name = registry.of_directory(path).model.__name__
    return (f"{prog}: model written to {path} (altjax format; load with {name}.from_pretrained({path!r}), "
            f"evaluate with altjax-eval --checkpoint {path})")


EXIT_CODES = {
    0: "done",
    1: "the run cannot go on: diverged, a failed checkpoint save, no usable checkpoint, full or read-only "
       "storage, a lost peer process (resume with the same command), or an unexpected error of altjax "
       "(with a traceback)",
    2: "a mistake in the command, config, workdir or checkpoint, reported before anything is written",
    SIGINT_EXIT: "stopped by SIGINT (Ctrl-C) after saving a checkpoint",
    SIGTERM_EXIT: "stopped by SIGTERM (preemption) after saving a checkpoint",
}


def _help_epilog() -> str:
    return "\n\n".join([
        console.help_section("tasks (config.task)", ", ".join(tasks.TASKS)),
        console.help_section(f"recipes (--config NAME: the files of {CONFIGS_DIR})",
                             ", ".join(f"{name} (task {load_config(name).task})" for name in recipes())),
        console.help_section(
            "config keys",
            "every entry of the config's get_config(): each recipe's docstring explains them, "
            "altjax.training.config how a config is read and checked, and --print-config shows them all. "
            "Each --config.KEY=VALUE (or --config.KEY VALUE) replaces one entry, KEY a dotted path "
            "(--config.total_steps=100, --config.model.text.hidden_size=64); VALUE is read as the type of the entry "
            "it replaces: true/false, a number, a Python literal for tuples, lists and dicts, else text."),
        console.help_section(
            "workdir",
            "receives config.json, checkpoints/, metrics.jsonl, evals.jsonl, eval_results.json, TensorBoard events "
            "and, at the end, the trained model in model/; the same command again resumes from the last checkpoint."),
        console.exit_status_help(EXIT_CODES),
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``altjax-train --config RECIPE|FILE[:ARG] --workdir DIR [--config.key=value ...] [--distributed ...]``;
    returns the exit status (:data:`EXIT_CODES`)."""
    parser = argparse.ArgumentParser(
        prog="altjax-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or resume) the task a config names, in a workdir: a dual encoder trained\n"
                    "contrastively, or a phase of AltCLIP's training.",
        epilog=_help_epilog())
    parser.add_argument("--config", required=True,
                        help="a recipe (below) or a Python file with get_config(); FILE:ARG calls get_config(ARG)")
    parser.add_argument("--workdir", help="checkpoints, logs, metrics and the final model (required to train)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config with the overrides applied, every key, and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, compile the step for the current devices, print the bytes per "
                             "device, the FLOPs of a step and the batch layout, and exit without writing anything "
                             "(simulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host TPU pods, GPU clusters); on "
                             "Cloud TPU, SLURM, Open MPI and Kubernetes it finds the other processes itself")
    parser.add_argument("--coordinator-address", help="with --distributed elsewhere: host:port of process 0")
    parser.add_argument("--num-processes", type=int, help="with --distributed elsewhere: the number of processes")
    parser.add_argument("--process-id", type=int, help="with --distributed elsewhere: this process's index")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    rest = list(rest)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides are --config.KEY=VALUE)")
        item = item[len("--config."):]
        if "=" not in item and rest and not rest[0].startswith("--"):
            item = f"{item}={rest.pop(0)}"  # --config.KEY VALUE
        overrides.append(item)
    if not (args.workdir or args.dry_run or args.print_config):
        parser.error("the following arguments are required: --workdir (or --dry-run, --print-config)")
    console.quiet_third_party(args.verbose)
    try:
        status = _run(args, overrides)
    except SystemExit as stop:  # a signal's agreed stop, after saving
        if not args.distributed:
            raise
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        if not args.distributed:
            raise
        traceback.print_exc()
        status = 1
    if args.distributed and status not in (0, SIGINT_EXIT, SIGTERM_EXIT):
        # A failed run does not meet its peers in JAX's shutdown: a process that failed alone has
        # ended them (altjax.training.peers), and process 0 has waited for them to leave first.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if args.distributed:
        peers.shutdown()
    return status


def _run(args, overrides: list[str]) -> int:
    try:
        config = load_config(args.config, overrides)
        if args.distributed:
            try:
                # JAX's own heartbeat aborts the process with a stack dump: it must not fire before
                # altjax's peer watch, which ends the run with one line (altjax.training.peers).
                peers.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                 process_id=args.process_id,
                                 heartbeat_timeout_s=max(100, int(config.peer_timeout_s) + 30))
            except (ValueError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(
                    f"--distributed: {first}; outside Cloud TPU, SLURM, Open MPI and Kubernetes give "
                    "--coordinator-address, --num-processes and --process-id") from None
        if args.print_config:
            print(config)
        elif args.dry_run:
            table = format_plan(plan(config))
            if jax.process_index() == 0:
                print(table)
        else:
            with console.third_party_stdout():  # tfds announces a dataset it generates there
                result = train(config, args.workdir)
            if jax.process_index() == 0:
                print(model_line("altjax-train", result["model"]))
    except USER_ERRORS + RUN_FAILURES as e:
        return report("altjax-train", e)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"altjax-train: error: {e.filename or args.workdir}: {e.strerror}; the run stopped; free space or fix "
              "the storage, then run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
