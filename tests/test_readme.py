"""The README's seed examples, run exactly as written.

The blocks marked ``<!-- seed-example: NAME -->`` are extracted from README.md: the shell block's
``altjax-convert`` lines run through the CLI, the Python blocks run in a fresh namespace, all in a
directory holding tiny random-weight HF checkpoints named as in the README (``align-base``,
``AltCLIP``) with their processor files, and the photos the examples open.
"""
import contextlib
import io
import os
import re
import shlex

import pytest
from PIL import Image

import skimage.data
from altjax_convert.cli import main as convert_main
from helpers import tiny_hf_dir

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def seed_examples() -> dict[str, str]:
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"<!-- seed-example: ([\w-]+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    return dict(blocks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("readme")
    tiny_hf_dir(directory / "align-base", "align")
    tiny_hf_dir(directory / "AltCLIP", "altclip")
    Image.fromarray(skimage.data.chelsea()).save(directory / "cat.jpg")
    Image.fromarray(skimage.data.coffee()).save(directory / "coffee.jpg")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        for line in seed_examples()["convert"].splitlines():
            argv = shlex.split(line, comments=True)
            assert argv[0] == "altjax-convert", f"unexpected command in the README's convert block: {line}"
            assert convert_main(argv[1:]) == 0, f"README command failed: {line}"
        yield directory
    finally:
        os.chdir(cwd)


def test_the_readme_has_the_seed_examples():
    assert set(seed_examples()) == {"convert", "using-the-models", "zero-shot", "zero-shot-altclip", "retrieval"}, \
        sorted(seed_examples())


@pytest.mark.parametrize("name", ["using-the-models", "zero-shot", "zero-shot-altclip", "retrieval"])
def test_seed_example_runs_as_written(name, workdir):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(seed_examples()[name], f"README.md:{name}", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue()
    assert printed.strip(), f"the {name} example printed nothing"
    if name == "zero-shot":
        probs = [float(p) for p in re.findall(r": ([0-9.]+)[,}]", printed)]
        assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-3, f"zero-shot probabilities {printed!r}"
    if name == "retrieval":
        assert printed.count("image ") >= 2 and "best image for 'a sleepy cat': " in printed, printed
