"""A training run's workdir: whose it is, who is running in it, and whether a config may resume it.

* **Ownership.** altjax trains only in a directory that does not exist yet, is empty, or is an
  altjax workdir (it holds the run lock or an altjax ``config.json``). A directory of the user's
  own files is refused: nothing a user wrote is overwritten.
* **One run at a time.** Process 0 of a run holds an exclusive ``flock`` on ``WORKDIR/run.lock``
  for the run's life; the file names the holder (host, pid, start time). The kernel releases the
  lock when the holder exits in any way, SIGKILL included, so a killed run never blocks its resume
  and no staleness heuristic (pid probing, heartbeats) is needed. On network filesystems Linux
  maps ``flock`` to the server's byte-range locks, which hold across hosts.
* **Remote workdirs.** A workdir may be in an object store (``gs://bucket/run``); everything here
  reads and writes it through ``etils.epath``. A store has no ``flock``: there the lock is the
  lock file itself, written only if absent and read back to check that it holds this run's
  record (:class:`RunLock` says what that leaves open). A run that ends in any way Python sees
  (success, an error, SIGTERM, SIGINT) deletes it; one killed outright (SIGKILL, a lost host)
  leaves it behind, and the next run is refused with the holder's record and the file to delete.
* **Resume compatibility.** A workdir with checkpoints resumes only under a config that computes
  the same run: what the model is, what data it reads in which order, what is optimised. Keys
  that only schedule the run (its length, logging, evaluation, checkpoint cadence) or its speed may
  change; :func:`compare_configs` lists both kinds of difference.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from typing import Any, Mapping, Optional

from etils import epath

from altjax import fsutil

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
    "optimizer.grad_clip_norm", "model.dtype", "compilation_cache_dir", "peer_timeout_s",
    # The run computes the same on any topology (altjax.data.order, the checkpoints' target shardings).
    "mesh.",
    # A trace of a few steps (altjax.training.profiler) changes nothing the run computes.
    "profile.",
)


class WorkdirError(ValueError):
    """The workdir cannot be used for this run (a user's mistake: one line, exit status 2)."""


def absolute(workdir: str | os.PathLike) -> str:
    """``workdir`` as a run names it: a local path made absolute, a remote one (``gs://...``)
    normalised but otherwise as given."""
    workdir = os.fspath(workdir)
    return str(epath.Path(workdir)) if fsutil.is_remote(workdir) else os.path.abspath(workdir)


# ----- ownership -----

def is_altjax_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``config.json`` that altjax-train wrote (a training config)."""
    try:
        config = json.loads(epath.Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"total_steps", "batch_size", "model", "data", "optimizer"} <= set(config)


def check_usable(workdir: str) -> None:
    """Raises WorkdirError unless ``workdir`` is new, empty or an altjax workdir."""
    remote = fsutil.is_remote(workdir)
    if remote:
        # A store has no directories: the workdir exists while objects are under its prefix, and
        # its parents need not exist at all.
        if not epath.Path(workdir).exists():
            return
        if not epath.Path(workdir).is_dir():
            raise WorkdirError(f"--workdir {workdir}: is a file, not a directory; give a new or an altjax workdir")
    else:
        if not os.path.lexists(workdir):
            parent = os.path.dirname(os.path.abspath(workdir))
            if os.path.lexists(parent) and not os.path.isdir(parent):
                raise WorkdirError(f"--workdir {workdir}: its parent {parent} is a file; give a path in a directory")
            return
        if not os.path.isdir(workdir):
            raise WorkdirError(f"--workdir {workdir}: is a file, not a directory; give a new or an altjax workdir")
    try:
        entries = sorted(p.name for p in epath.Path(workdir).iterdir()) if remote else sorted(os.listdir(workdir))
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: cannot be read ({e.strerror or e})") from None
    if not entries or LOCK_FILE in entries or is_altjax_config(os.path.join(workdir, CONFIG_FILE)):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise WorkdirError(f"--workdir {workdir}: holds files altjax did not write ({shown}); "
                       "give a new or empty directory, or the workdir of an earlier altjax run")


# ----- the run lock -----

class RunLock:
    """The exclusive lock of one run on its workdir (see the module docstring).

    Local workdirs: an ``flock``, which the kernel releases when the holder exits in any way.
    Remote ones: the lock file, written only when absent, with the holder and a token unique to
    this run, then read back after :attr:`SETTLE_SECONDS`; when two runs start together the last
    writer's record stays and the other run, reading it back, gives way. The check and the write
    are two requests (epath offers no create-if-absent), so two runs can both pass only if one
    took longer than :attr:`SETTLE_SECONDS` between them. The file is deleted on release (if it
    still holds this run's token); a run killed outright leaves it, and is reported as a possibly
    stale lock with the file to delete.
    """

    SETTLE_SECONDS = 1.0

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.created = False  # whether acquire() created the lock file
        self._fd: Optional[int] = None
        self._token: Optional[str] = None  # remote: the token of the record this run wrote

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirError naming the run that holds it. On a local workdir
        the file is not written yet (a run refused after this leaves it as it was): :meth:`record`
        does that. On a remote one taking the lock is writing the file."""
        if fsutil.is_remote(self.path):
            self._acquire_remote()
            return
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

    def _acquire_remote(self) -> None:
        path, workdir = epath.Path(self.path), os.path.dirname(self.path)
        if path.exists():
            raise WorkdirError(f"--workdir {workdir}: another run is training in it ({describe_holder(self.path)}), "
                               "or one was killed before it could remove its lock (a lock in an object store is a "
                               f"file nothing removes when its holder dies); if no run is training in it, delete "
                               f"{self.path} and start again, or use another workdir")
        token = uuid.uuid4().hex
        path.write_bytes((json.dumps({**_holder(), "token": token}) + "\n").encode())
        time.sleep(self.SETTLE_SECONDS)
        if _read_holder(self.path).get("token") != token:
            raise WorkdirError(f"--workdir {workdir}: another run took it at the same moment "
                               f"({describe_holder(self.path)}); wait for it to end or stop it, or use another workdir")
        self.created, self._token = True, token

    def record(self) -> None:
        """Writes the holder (host, pid, start time) into the lock file for a refused second run
        (on a remote workdir :meth:`acquire` has written it already)."""
        if self._token is not None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(_holder()) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._token is not None:
            # Released while leaving, perhaps with an error: a lock that cannot be deleted now is
            # reported to the next run as possibly stale.
            with contextlib.suppress(OSError):
                if _read_holder(self.path).get("token") == self._token:
                    epath.Path(self.path).unlink()
            self._token = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        self.record()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_holder(path: str) -> dict[str, Any]:
    """The record in a lock file (``{}`` when it holds none yet); OSError when it cannot be read."""
    holder = json.loads(epath.Path(path).read_bytes().decode("utf-8") or "{}")
    if not isinstance(holder, dict):
        raise ValueError(f"{path}: not a lock record")
    return holder


def describe_holder(path: str) -> str:
    """``"host h, pid 12, started 2026-..."`` from a lock file (its holder wrote it)."""
    try:
        holder = _read_holder(path)
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
    if not epath.Path(path).exists():
        return None
    try:
        return json.loads(epath.Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: cannot be read ({e}); restore it from the run's record or use another "
                           "workdir") from None


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir holds at least one finished checkpoint step."""
    directory = epath.Path(workdir) / CHECKPOINTS_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``path`` through a temporary sibling renamed into place (permissions from the umask;
    a remote path: :func:`altjax.fsutil.write_remote`)."""
    if fsutil.is_remote(path):
        fsutil.write_remote(path, text.encode())
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
