"""The README's code blocks, run exactly as written.

Every ``python`` and ``bash`` block of README.md is marked by the HTML comment above it: either
``<!-- seed-example: NAME -->``, and this file runs it, or ``<!-- not-run: WHY -->`` (an install
command, a cluster launch, paths that stand for the reader's data), and the reason is shown in the
README's source. Output samples are ``text`` blocks. The examples run in a directory holding tiny
random-weight HF checkpoints served offline under the Hub ids the README names (a Hugging Face
cache built here, ``HF_HUB_OFFLINE=1``), and the photos, captions and templates the examples read: the Python blocks in a
fresh namespace in this process, the shell blocks through bash with ``set -e`` and the installed
commands on the PATH, the ``convert`` block first because the others read what it writes.
"""
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

import skimage.data
import test_train
from helpers import cache_repo, tiny_hf_dir
from huggingface_hub import constants

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# The Hub ids the examples name, served offline from a cache of tiny random-weight models.
HUB_MODELS = {"kakaobrain/align-base": "align", "BAAI/AltCLIP": "altclip"}
MARKER = re.compile(r"<!-- (seed-example|not-run): (.+?) -->")


def code_blocks() -> list[tuple[int, str, str, str, str]]:
    """Every fenced block: (line, language, marker kind, marker value, text); the marker is the HTML
    comment on the line above the fence ("" when there is none)."""
    lines = open(README, encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        marker = MARKER.fullmatch(lines[start - 1].strip()) if start else None
        text = "\n".join(line[len(indent):] for line in lines[start + 1:end]) + "\n"
        blocks.append((start + 1, fence.group(2), marker.group(1) if marker else "",
                       marker.group(2) if marker else "", text))
        i = end + 1
    return blocks


def seed_examples() -> dict[str, tuple[str, str]]:
    """NAME -> (language, code) of the blocks marked ``seed-example``."""
    return {value: (language, text) for _, language, kind, value, text in code_blocks() if kind == "seed-example"}


def test_every_code_block_is_run_or_says_why_not():
    unmarked = [f"README.md:{line} ({language or 'no language'})" for line, language, kind, _, _ in code_blocks()
                if language != "text" and not kind]
    assert not unmarked, ("code blocks without a <!-- seed-example: NAME --> or <!-- not-run: WHY --> marker "
                          f"(output samples are ```text blocks): {unmarked}")
    names = [value for _, _, kind, value, _ in code_blocks() if kind == "seed-example"]
    assert len(names) == len(set(names)), f"seed example names used twice: {sorted(names)}"
    languages = {name: language for name, (language, _) in seed_examples().items()}
    assert set(languages.values()) <= {"python", "bash"}, f"seed examples must be python or bash: {languages}"


def run_bash(code: str, *, env: dict, what: str) -> str:
    run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, (f"the README's {what} block failed (exit {run.returncode}):\n{code}\n"
                                 f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}")
    return run.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("readme")
    models, cache = tmp_path_factory.mktemp("readme-models"), tmp_path_factory.mktemp("readme-hub-cache")
    for repo_id, model_type in HUB_MODELS.items():
        tiny_hf_dir(models / model_type, model_type)
        cache_repo(str(cache), repo_id, models / model_type, "0" * 40)
    for name, image in (("cat", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        Image.fromarray(image).save(directory / f"{name}.jpg")
        (directory / "photos" / name).mkdir(parents=True)
        Image.fromarray(image).save(directory / "photos" / name / f"{name}.jpg")
    (directory / "captions.txt").write_text("a cat lying on a blanket\na cup of coffee on a saucer\n")
    (directory / "my_templates.txt").write_text("a photo of a {}.\na close-up photo of a {}.\n")
    hub_env = dict(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    env = dict(test_train.cli_env(test_train.jax_cache(tmp_path_factory)), **hub_env,
               ALTJAX_DATA_DIR=str(tmp_path_factory.mktemp("readme-tfds")),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in hub_env.items():
            patch.setenv(name, value)
        # huggingface_hub read HF_HUB_CACHE when this process imported it.
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.chdir(directory)
        run_bash(seed_examples()["convert"][1], env=env, what="convert")
        yield directory, env


@pytest.mark.parametrize("name", sorted(set(seed_examples()) - {"convert"}))
def test_seed_example_runs_as_written(name, workdir):
    directory, env = workdir
    language, code = seed_examples()[name]
    if language == "bash":
        printed = run_bash(code, env=env, what=name)
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md:{name}", "exec"), {"__name__": "__readme__"})
        printed = out.getvalue()
    if name == "zero-shot":
        probs = [float(p) for p in re.findall(r": ([0-9.]+)[,}]", printed)]
        assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-3, f"zero-shot probabilities {printed!r}"
    elif name == "retrieval":
        assert printed.count("image ") >= 2 and "best image for 'a sleepy cat': " in printed, printed
    elif name == "train":
        assert (directory / "demo-adamw" / "model" / "config.json").is_file(), f"no model written:\n{printed}"
    elif name == "eval":
        results = (directory / "eval_results.json").read_text()
        for key in ("zeroshot/scenes/en", "retrieval/scenes/zh"):
            assert key in results, f"eval_results.json lacks {key}: {results}"
        assert printed.count("\nzeroshot/") == 2 and "photos" in printed, f"no table for ./photos:\n{printed}"
    elif name == "embed":
        assert "cat.jpg" in printed and "a cat lying on a blanket" in printed, f"no matches printed:\n{printed}"
    else:
        assert printed.strip(), f"the {name} example printed nothing"
