"""Files and directories altjax writes: permissions from the umask, temporary siblings, swaps.

``tempfile.mkdtemp`` creates 0700 directories and ``mkstemp`` 0600 files whatever the umask, so an
output written into a temporary sibling and renamed into place would stay private to its owner on
a shared filesystem. Everything here gives what ``os.makedirs`` / ``open`` would have given under
the current umask: ``0o777 & ~umask`` for directories, ``0o666 & ~umask`` for files (``0o777 &
~umask`` for files that were executable).

A path may also be remote (``gs://bucket/run``: :func:`is_remote`), read and written through
``etils.epath``. Permissions do not apply there (:func:`apply_umask` leaves it alone), and an
object store has no directories of its own, no appends and no atomic rename of a directory:
:func:`write_remote` and :func:`publish_remote_dir` write such paths.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile

from etils import epath

# The URI schemes epath sends to a remote filesystem; every other path is a local one.
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object in a remote store (``gs://``, ``s3://``, ...)."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(st_mode: int, mask: int) -> int:
    if stat.S_ISDIR(st_mode) or st_mode & 0o111:
        return 0o777 & ~mask
    return 0o666 & ~mask


def apply_umask(path: str | os.PathLike, *, recursive: bool = True) -> None:
    """Gives ``path`` (and, when it is a directory and ``recursive``, everything under it) the mode
    ``os.makedirs`` / ``open`` would have given it under the current umask. Symbolic links are
    left alone (neither changed nor followed), and so are remote paths (they have no modes)."""
    if is_remote(path):
        return
    mask = current_umask()
    path = os.fspath(path)

    def fix(p: str) -> None:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return
        want = _mode(st.st_mode, mask)
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)

    fix(path)
    if recursive and os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                fix(os.path.join(root, name))


def make_temp_dir(parent: str | os.PathLike, prefix: str, suffix: str = "") -> str:
    """``tempfile.mkdtemp`` in ``parent`` with the umask's directory mode instead of 0700."""
    path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=os.fspath(parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def make_temp_file(parent: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``parent`` with the umask's file mode instead of 0600; returns
    ``(fd, path)`` as mkstemp does."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.fspath(parent))
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, path


def output_path(path: str | os.PathLike) -> str:
    """The absolute path of the directory entry ``path`` names, as the kernel resolves it: symbolic
    links and ``..`` in its parent resolved (``m/..`` with ``m`` a link is the link target's
    parent), the last component itself kept (a link at ``path`` stays the link)."""
    raw = os.path.join(os.getcwd(), os.fspath(path)).rstrip(os.sep) or os.sep
    parent, base = os.path.split(raw)
    if base in ("", ".", ".."):
        return os.path.realpath(raw)
    return os.path.join(os.path.realpath(parent), base)


def replace_path(new: str, path: str) -> None:
    """Renames ``new`` to ``path``; an existing ``path`` is first moved aside into a temporary
    sibling and removed once ``new`` is in place (put back if the rename fails)."""
    parent, base = os.path.split(path)
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    aside = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    old = os.path.join(aside, "old")
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_remote(path: str | os.PathLike, data: bytes) -> None:
    """Writes the remote file ``path`` through a temporary sibling renamed into place. An object
    store makes a single object write atomic anyway (readers see the old or the new object, never
    a part); the rename keeps the same guarantee on remote filesystems that are not object stores."""
    target = epath.Path(path)
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def publish_remote_dir(local: str | os.PathLike, target: str | os.PathLike, *, last: tuple[str, ...] = ()) -> None:
    """Puts the finished local directory ``local`` at the remote directory ``target``, replacing
    what is there.

    Everything is uploaded into a temporary sibling first, so a failed upload leaves ``target``
    as it was. Then ``target`` is removed and the sibling renamed to it: an object store renames a
    directory one object at a time (a copy and a delete each, quick within a bucket but not
    atomic), so the top-level files named in ``last`` are uploaded only after the rename; a reader
    that needs them (a model directory's ``config.json``) never sees a partial directory."""
    local, target = os.fspath(local), epath.Path(target)
    fresh = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        fresh.rmtree(missing_ok=True)  # what a killed attempt of this process id left
        for root, _, files in os.walk(local):
            relative = os.path.relpath(root, local)
            # No mkdir: objects need no parent directories (and a store's mkdir may create a bucket).
            directory = fresh if relative == "." else fresh / relative
            for name in files:
                if relative != "." or name not in last:
                    _upload(os.path.join(root, name), directory / name)
        if target.exists():
            target.rmtree()
        if fresh.exists():  # nothing was uploaded when every file is in ``last``
            fresh.rename(target)
        for name in last:
            if os.path.isfile(os.path.join(local, name)):
                _upload(os.path.join(local, name), target / name)
    except BaseException:
        with contextlib.suppress(OSError):
            fresh.rmtree(missing_ok=True)
        raise


def _upload(file: str, dst: epath.Path) -> None:
    with open(file, "rb") as src, dst.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)
