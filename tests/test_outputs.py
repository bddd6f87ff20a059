"""What altjax writes and what it replaces (issue 14, items 1, 6 and 8 for checkpoints and
altjax-convert):

* ``--overwrite`` / ``save_pretrained(overwrite=True)`` replace only an output altjax wrote, never
  the source, a directory holding it, a file, a link or anyone else's directory; a refusal is one
  line, exit status 2, and leaves every file as it was.
* A corrupt or incomplete altjax (or HF) directory gives one line naming the file or the missing
  array, and nothing after it (no ``Event loop is closed`` tracebacks from orbax at exit).
* A full disk while writing gives one line naming the output, exit 2, and leaves nothing behind.
* Directories and files altjax writes get the modes the umask gives, not mkdtemp's 0700/0600.
"""
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from altjax.model_io import directories
from altjax.model_io.directories import CheckpointError
from altjax.models.align import AlignModel
from altjax_convert.cli import main
from helpers import tiny_hf_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny ALIGN as transformers wrote it (``hf``) and as altjax wrote it (``jax``)."""
    root = tmp_path_factory.mktemp("outputs")
    tiny_hf_dir(root / "hf", "align")
    AlignModel.from_pretrained(root / "hf").save_pretrained(root / "jax")
    return root


def snapshot(root) -> dict[str, str]:
    """Every entry under ``root`` (and ``root`` itself): kind, and a digest of each file's bytes."""
    found = {}
    for here, subdirs, files in os.walk(root):
        for name in subdirs + files + ([""] if here == str(root) else []):
            p = os.path.join(here, name) if name else here
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                found[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                found[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    found[rel] = hashlib.sha256(f.read()).hexdigest()
    return found


def convert(capsys, *argv):
    code = main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, *argv, match, intact):
    """altjax-convert refuses with exit 2 and one line; nothing under ``intact`` changed."""
    before = snapshot(intact)
    code, out, err = convert(capsys, *argv)
    lines = err.splitlines()
    assert code == 2, f"exit status {code} (expected 2) for {argv}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("altjax-convert: error: "), f"not one error line: {err!r}"
    assert match in lines[0], f"error {lines[0]!r} does not say {match!r}"
    after = snapshot(intact)
    changed = sorted(set(before) ^ set(after)) or sorted(k for k in before if before[k] != after[k])
    assert not changed, f"{argv}: a refused --overwrite changed {intact}: {changed[:10]}"


# --- 1. --overwrite replaces only what altjax wrote -----------------------------------------------


def test_overwrite_refuses_the_source_its_parents_and_what_altjax_did_not_write(dirs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    deep = work / "a" / "b"
    deep.mkdir(parents=True)
    shutil.copytree(dirs / "jax", deep / "m")
    (work / "notes.txt").write_text("a colleague's notes\n")
    (work / "a" / "results.csv").write_text("step,loss\n")
    (work / "other").mkdir()
    (work / "other" / "data.bin").write_bytes(b"\0" * 10)
    shutil.copytree(dirs / "hf", work / "theirs")  # an HF directory transformers wrote, not altjax
    shutil.copytree(dirs / "jax", work / "added")
    (work / "added" / "README.md").write_text("my notes on this model\n")
    os.symlink(deep / "m", work / "link")
    monkeypatch.chdir(work)

    # The reported case: OUT is the source's parent.
    assert_refused(capsys, "to-hf", "./a/b/m", "./a/b/m/..", "--overwrite", match="contains the source", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "a", "--overwrite", match="contains the source", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", ".", "--overwrite", match="contains the source", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "a/b/m", "--overwrite", match="is the source directory", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "./a/b/m/", "--overwrite", match="is the source directory", intact=work)
    # "link/.." is, for the kernel, the parent of the link's target (a/b), not the current directory.
    assert_refused(capsys, "to-hf", "a/b/m", "link/..", "--overwrite", match="contains the source", intact=work)
    assert_refused(capsys, "to-altjax", "theirs", "link", "--overwrite", match="is a symbolic link", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "notes.txt", "--overwrite", match="is a file altjax did not write",
                   intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "other", "--overwrite", match="is not an output altjax wrote (it holds data.bin)",
                   intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "theirs", "--overwrite", match="is not an output altjax wrote", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "added", "--overwrite", match="is not an output altjax wrote", intact=work)
    assert_refused(capsys, "to-hf", "a/b/m", "other", match="output path exists (choose another path or pass --overwrite)",
                   intact=work)

    # Earlier outputs of altjax (either kind) and empty directories are replaced.
    assert convert(capsys, "to-hf", "a/b/m", "hf_out")[0] == 0
    assert convert(capsys, "to-altjax", "hf_out", "jax_out")[0] == 0
    (work / "empty").mkdir()
    for out in ("hf_out", "jax_out", "empty"):
        for direction, src in (("to-hf", "a/b/m"), ("to-altjax", "theirs")):
            code, _, err = convert(capsys, direction, src, out, "--overwrite")
            assert code == 0, f"{direction} {src} {out} --overwrite: {err}"
            assert directories.is_altjax_output(work / out), f"{out} after {direction}: {os.listdir(work / out)}"
    assert not [f for f in os.listdir(work) if f.startswith(".")], f"temporary directories left: {os.listdir(work)}"
    assert (work / "notes.txt").read_text() == "a colleague's notes\n"


def test_save_pretrained_overwrite_replaces_only_what_altjax_wrote(dirs, tmp_path):
    shutil.copytree(dirs / "jax", tmp_path / "m")
    model = AlignModel.from_pretrained(tmp_path / "m")
    before = snapshot(tmp_path)
    for out, match in [(tmp_path / "m", "is the source directory"), (tmp_path, "contains the source"),
                       (tmp_path / "m" / "..", "contains the source")]:
        with pytest.raises(CheckpointError, match=match) as e:
            model.save_pretrained(out, overwrite=True)
        assert "\n" not in str(e.value)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"user: exists and is not an output altjax wrote \(it holds keep\.txt\)"):
        model.save_pretrained(tmp_path / "user", overwrite=True, format="hf")
    assert (tmp_path / "user" / "keep.txt").read_text() == "x"
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("user")} == before

    # An earlier export of either format is replaced, by either format.
    model.save_pretrained(tmp_path / "export")
    for fmt in ("hf", "hf", "altjax", "altjax"):
        model.save_pretrained(tmp_path / "export", overwrite=True, format=fmt)
        kind = "model.safetensors" if fmt == "hf" else "params"
        assert os.path.exists(tmp_path / "export" / kind), f"format={fmt}: {os.listdir(tmp_path / 'export')}"

    # The helper for other outputs (the trainer's export): sources and ownership are the caller's.
    with pytest.raises(CheckpointError, match="contains the source"):
        directories.check_replaceable(tmp_path, sources=(tmp_path / "m" / "params",), owned=lambda p: True)
    assert directories.check_replaceable(tmp_path / "user", owned=lambda p: True) == str(tmp_path / "user")
    assert directories.check_replaceable(tmp_path / "absent") == str(tmp_path / "absent")
    # An HF directory counts as altjax's only when its safetensors say altjax wrote them.
    assert directories.is_altjax_output(tmp_path / "m") and not directories.is_altjax_output(dirs / "hf")
    with directories.atomic_directory(tmp_path / "atomic") as tmp:
        open(os.path.join(tmp, "x.json"), "w").close()
    with pytest.raises(CheckpointError, match="not an output altjax wrote"):
        with directories.atomic_directory(tmp_path / "atomic", overwrite=True) as tmp:
            raise AssertionError("the block must not run")
    with directories.atomic_directory(tmp_path / "atomic", overwrite=True, owned=lambda p: True) as tmp:
        open(os.path.join(tmp, "y.json"), "w").close()
    assert os.listdir(tmp_path / "atomic") == ["y.json"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], f"temporary directories left: {os.listdir(tmp_path)}"


# --- 6. corrupt or incomplete directories: one line, nothing after it ------------------------------


def _chunk(directory, array):
    folder = directory / "params" / array
    return folder / next(f for f in os.listdir(folder) if not f.startswith("."))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    # name: (source kind, how to damage it, what the one line must say)
    "truncated array file": ("jax", lambda d: _truncate(_chunk(d, "text_projection.kernel"), 10),
                             "params/text_projection.kernel: cannot read the array"),
    "deleted array": ("jax", lambda d: shutil.rmtree(d / "params" / "temperature"),
                      "params: the array 'temperature' is missing"),
    "deleted chunk": ("jax", lambda d: os.remove(_chunk(d, "text_projection.bias")),
                      "text_projection.bias/0: missing (a chunk of the array 'text_projection.bias')"),
    "garbage .zarray": ("jax", lambda d: (d / "params" / "temperature" / ".zarray").write_text("{"),
                        "params/temperature: cannot open the array"),
    "truncated _METADATA": ("jax", lambda d: _truncate(d / "params" / "_METADATA", 100), "_METADATA: not valid JSON"),
    "deleted _METADATA": ("jax", lambda d: os.remove(d / "params" / "_METADATA"), "_METADATA: missing"),
    "missing config.json": ("jax", lambda d: os.remove(d / "config.json"), "no config.json in the model directory"),
    "garbage config.json": ("jax", lambda d: (d / "config.json").write_bytes(b"\x89PNG garbage"),
                            "config.json: not valid JSON"),
    "wrong model_type": ("jax", lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})),
                         "model_type is 'bert'"),
    "truncated safetensors": ("hf", lambda d: _truncate(d / "model.safetensors", 5000),
                              "model.safetensors: not a readable safetensors file"),
    "HF without config.json": ("hf", lambda d: os.remove(d / "config.json"), "no config.json"),
}


def _cli(*argv):
    return subprocess.Popen([sys.executable, "-m", "altjax_convert", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_corrupt_directories_give_one_line_and_nothing_after_it(dirs, tmp_path):
    runs = {}
    for name, (kind, damage, _) in CORRUPTIONS.items():
        src = tmp_path / name.replace(" ", "_")
        shutil.copytree(dirs / kind, src)
        damage(src)
        direction = "to-hf" if kind == "jax" else "to-altjax"
        runs[name] = _cli(direction, src, tmp_path / f"out_{src.name}", "--quiet")
    # Without --quiet the progress lines come first, and the error line is still the last word.
    noisy = tmp_path / "noisy"
    shutil.copytree(dirs / "jax", noisy)
    _truncate(_chunk(noisy, "text_projection.kernel"), 10)
    runs["not quiet"] = _cli("to-hf", noisy, tmp_path / "out_noisy")
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        lines = err.splitlines()
        where = f"{name}: exit {proc.returncode}; stderr:\n{err}"
        assert proc.returncode == 2, where
        assert "Traceback" not in err and "Event loop is closed" not in err, where
        assert lines and lines[-1].startswith("altjax-convert: error: "), where
        assert name == "not quiet" or len(lines) == 1, f"more than one line on stderr for {where}"
        assert CORRUPTIONS.get(name, CORRUPTIONS["truncated array file"])[2] in lines[-1], where
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(("out_", "."))]
    assert not leftovers, f"written despite the error: {leftovers}"


def test_missing_array_is_named_by_from_pretrained(dirs, tmp_path):
    shutil.copytree(dirs / "jax", tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "params" / "text_projection.kernel")
    with pytest.raises(CheckpointError, match=r"the array 'text_projection\.kernel' is missing") as e:
        AlignModel.from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value) and "NoneType" not in str(e.value)


class FullDisk:
    """A file whose every write fails as on a full disk (naming no file, as ``f.write`` does)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def orbax_full_disk(*args, **kwargs):  # what orbax raises when tensorstore cannot write an array
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/0.0": Failed to write 3160944 bytes '
                     "to file 17: No space left on device [os_error_code='28']")


def test_a_full_disk_gives_one_line_and_leaves_nothing(dirs, tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    model = AlignModel.from_pretrained(dirs / "jax")
    monkeypatch.setattr(ocp.Checkpointer, "save", orbax_full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        model.save_pretrained(tmp_path / "jax")
    code, out, err = convert(capsys, "to-altjax", dirs / "hf", tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr("altjax.model_io.safetensors_io.open", FullDisk, raising=False)  # the writer's; the orbax reader is tensorstore
    with pytest.raises(OSError, match="No space left on device") as e:
        model.save_pretrained(tmp_path / "hf", format="hf")
    assert e.value.filename and e.value.filename.endswith("model.safetensors"), f"no file named: {e.value!r}"
    results = [(code, err), convert(capsys, "to-hf", dirs / "jax", tmp_path / "out")[::2]]
    for code, err in results:
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, f"exit {code}, stderr {err!r}"
        assert lines[0] == f"altjax-convert: error: {tmp_path / 'out'}: cannot write the output (No space left on device); " \
                           "nothing written", lines[0]
    assert os.listdir(tmp_path) == [], f"a failed write left {os.listdir(tmp_path)}"


# --- 8. permissions follow the umask -----------------------------------------------------------


def modes(root) -> dict[str, str]:
    """Every directory and file under ``root`` (itself included) that does not have the mode
    ``os.makedirs`` / ``open`` would give under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    wrong = {}
    for here, subdirs, files in os.walk(root):
        for p in [here] + [os.path.join(here, f) for f in files]:
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            want = (0o777 if os.path.isdir(p) else 0o666) & ~mask
            if mode != want:
                wrong[os.path.relpath(p, root)] = f"{mode:o} (want {want:o})"
    return wrong


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_modes_the_umask_gives(dirs, tmp_path, umask, capsys):
    from altjax.tensorboard import EventWriter

    src = tmp_path / "src"
    shutil.copytree(dirs / "hf", src)
    for name in os.listdir(src):
        os.chmod(src / name, 0o600)  # processor files copied along get the umask's mode, not their source's
    old = os.umask(umask)
    try:
        model = AlignModel.from_pretrained(src)
        model.save_pretrained(tmp_path / "jax")
        model.save_pretrained(tmp_path / "hf", format="hf")
        model.save_pretrained(tmp_path / "hf", format="hf", overwrite=True)
        for argv in (["to-altjax", src, tmp_path / "c_jax"], ["to-hf", tmp_path / "jax", tmp_path / "c_hf", "--max-shard-size", "100KB"],
                     ["to-hf", tmp_path / "jax", tmp_path / "c_hf", "--overwrite"]):
            code, _, err = convert(capsys, *argv)
            assert code == 0, err
        EventWriter(str(tmp_path / "tb")).close()
        for out in ("jax", "hf", "c_jax", "c_hf", "tb"):
            wrong = modes(tmp_path / out)
            assert not wrong, f"umask {umask:03o}: {out}: {dict(list(wrong.items())[:8])}"
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_fsutil_helpers_give_the_umask_modes(tmp_path, umask):
    from altjax import fsutil

    old = os.umask(umask)
    try:
        assert fsutil.current_umask() == umask
        directory = fsutil.make_temp_dir(tmp_path, prefix=".stage-")
        fd, file = fsutil.make_temp_file(directory, prefix=".x-", suffix=".json")
        os.close(fd)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o777 & ~umask
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o666 & ~umask
        os.makedirs(os.path.join(directory, "sub"), mode=0o700)
        with open(os.path.join(directory, "sub", "f"), "w"):
            pass
        os.chmod(os.path.join(directory, "sub", "f"), 0o600)
        fsutil.apply_umask(directory)
        assert not modes(directory), modes(directory)
        fsutil.replace_path(directory, str(tmp_path / "final"))
        assert sorted(os.listdir(tmp_path)) == ["final"]
    finally:
        os.umask(old)
