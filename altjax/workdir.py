"""A training run's workdir: whose it is, who is running in it, and whether a config may resume it.

* **Ownership.** altjax trains only in a directory that does not exist yet, is empty, or is an
  altjax workdir (it holds the run lock or an altjax ``config.json``). A directory of the user's
  own files is refused: nothing a user wrote is overwritten.
* **One run at a time.** Process 0 of a run holds an exclusive ``flock`` on ``WORKDIR/run.lock``
  for the run's life; the file names the holder (host, pid, start time). The kernel releases the
  lock when the holder exits in any way, SIGKILL included, so a killed run never blocks its resume
  and no staleness heuristic (pid probing, heartbeats) is needed. On network filesystems Linux
  maps ``flock`` to the server's byte-range locks, which hold across hosts.
* **Resume compatibility.** A workdir with checkpoints resumes only under a config that computes
  the same run: what the model is, what data it reads in which order, what is optimised. Keys
  that only schedule the run (its length, logging, evaluation, checkpoint cadence) or its speed may
  change; :func:`compare_configs` lists both kinds of difference.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Mapping, Optional

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"

# Keys that may differ between a run and its resume (prefix match on dotted keys): they change
# when and how fast things happen, or how the run is evaluated, not which numbers are computed.
# The learning-rate schedule is here too: lowering it to rescue a run is a researcher's call, and
# the warning says it changed.
RESUMABLE_CHANGES = (
    "total_steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints", "async_checkpoints",
    "eval.", "data.num_threads", "data.prefetch", "remat", "remat_policy", "warn_chance_steps",
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.decay", "optimizer.end_factor",
    "optimizer.grad_clip_norm", "model.dtype", "compilation_cache_dir",
)


class WorkdirError(ValueError):
    """The workdir cannot be used for this run (a user's mistake: one line, exit status 2)."""


# ----- ownership -----

def is_altjax_config(path: str) -> bool:
    """Whether ``path`` is a ``config.json`` that altjax-train wrote (a training config)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"total_steps", "batch_size", "model", "data", "optimizer"} <= set(config)


def check_usable(workdir: str) -> None:
    """Raises WorkdirError unless ``workdir`` is new, empty or an altjax workdir."""
    if not os.path.lexists(workdir):
        parent = os.path.dirname(os.path.abspath(workdir))
        if os.path.lexists(parent) and not os.path.isdir(parent):
            raise WorkdirError(f"--workdir {workdir}: its parent {parent} is a file; give a path in a directory")
        return
    if not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir}: is a file, not a directory; give a new or an altjax workdir")
    try:
        entries = sorted(os.listdir(workdir))
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: cannot be read ({e.strerror})") from None
    if not entries or LOCK_FILE in entries or is_altjax_config(os.path.join(workdir, CONFIG_FILE)):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise WorkdirError(f"--workdir {workdir}: holds files altjax did not write ({shown}); "
                       "give a new or empty directory, or the workdir of an earlier altjax run")


# ----- the run lock -----

class RunLock:
    """The exclusive lock of one run on its workdir (see the module docstring)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.created = False  # whether acquire() created the lock file
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirError naming the run that holds it. The file is not
        written yet (a run refused after this leaves it as it was): :meth:`record` does that."""
        self.created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            self.created = False
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"--workdir {os.path.dirname(self.path)}: another run is training in it "
                                   f"({describe_holder(self.path)}); wait for it to end or stop it, or use "
                                   "another workdir") from None
            raise WorkdirError(f"{self.path}: cannot lock the workdir ({e.strerror}); altjax-train needs a "
                               "filesystem with file locks (local disks and NFS have them)") from None
        self._fd = fd

    def record(self) -> None:
        """Writes the holder (host, pid, start time) into the lock file for a refused second run."""
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        self.record()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(path: str) -> str:
    """``"host h, pid 12, started 2026-..."`` from a lock file (its holder wrote it)."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read() or "{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder did not record itself yet"


# ----- resume compatibility -----

def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _normalise(value: Any) -> Any:
    # config.json stores tuples as lists; compare values, not container types.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(blocking, allowed)``: the differences between the config a workdir was run with and
    this run's, each ``"key: old -> new"``; ``allowed`` are those in :data:`RESUMABLE_CHANGES`."""
    old, new = _flatten(_normalise(dict(saved))), _flatten(_normalise(dict(current)))
    blocking, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] == new[key]:
            continue
        text = f"{key}: {json.dumps(old.get(key, '<absent>'))} -> {json.dumps(new.get(key, '<absent>'))}"
        (allowed if key.startswith(RESUMABLE_CHANGES) else blocking).append(text)
    return blocking, allowed


def read_config(workdir: str) -> Optional[dict[str, Any]]:
    """The ``config.json`` a workdir's run was started with, or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: cannot be read ({e}); restore it from the run's record or use another "
                           "workdir") from None


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir holds at least one finished checkpoint step."""
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``path`` through a temporary sibling renamed into place (permissions from the umask)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
