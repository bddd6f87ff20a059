"""Files and directories altjax writes: permissions from the umask, temporary siblings, swaps.

``tempfile.mkdtemp`` creates 0700 directories and ``mkstemp`` 0600 files whatever the umask, so an
output written into a temporary sibling and renamed into place would stay private to its owner on
a shared filesystem. Everything here gives what ``os.makedirs`` / ``open`` would have given under
the current umask: ``0o777 & ~umask`` for directories, ``0o666 & ~umask`` for files (``0o777 &
~umask`` for files that were executable).
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile


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
    left alone (neither changed nor followed)."""
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
