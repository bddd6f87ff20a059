"""``altjax-eval`` and ``altjax-embed`` end to end on a tiny random ALIGN saved as an HF directory.

The metrics the CLI writes are compared exactly with ``evaluate_zeroshot`` / ``evaluate_retrieval``
called in this process (the CLI is plumbing around them: dataset resolution, templates, names,
the JSON file). Embedding files are compared exactly (atol 0) with ``Embedder`` outputs, which run
the same jitted function on the same batch shapes; search scores to 1e-6.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from altjax import AlignModel, AlignProcessor
from altjax.evaluation import Embedder, evaluate_retrieval, evaluate_zeroshot, load_dataset
from altjax.evaluation import cli, results
from altjax.evaluation.cli import embed_main, eval_main, format_table
from altjax.evaluation.templates import get_templates
from helpers import assert_close
from tests import multihost_eval_worker as worker

VENV_BIN = Path(sys.executable).parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def align_dir(tmp_path_factory):
    return worker.tiny_align_dir(str(tmp_path_factory.getbasetemp() / "tiny-align"))


@pytest.fixture(scope="module")
def align(align_dir):
    return AlignModel.from_pretrained(align_dir), AlignProcessor.from_pretrained(align_dir)


def _picture(path, colour, seed):
    rng = np.random.default_rng(seed)
    size = (30 + 7 * (seed % 3), 26 + 5 * (seed % 2))
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``shapes/<class>/*.png`` (3 classes, 3 + 2 + 3 images) and ``photos/`` with a captions file."""
    root = tmp_path_factory.mktemp("data")
    count = 0
    for name, n in (("red_square", 3), ("green_circle", 2), ("blue_star", 3)):
        for i in range(n):
            _picture(str(root / "shapes" / name / f"{i}.png"), COLOURS[name.split("_")[0]], count)
            count += 1
    lines = []
    for i, colour in enumerate(["red", "green", "blue", "red", "blue"]):
        _picture(str(root / "photos" / f"p{i}.png"), COLOURS[colour], 10 + i)
        captions = [f"a {colour} picture", f"something {colour} number {i}"][: 1 + i % 2]
        lines.append(json.dumps({"image": f"p{i}.png", "captions": captions}))
    (root / "photos" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_eval_zeroshot_and_retrieval(align_dir, align, folders, tmp_path, capsys):
    model, processor = align
    output = tmp_path / "results" / "eval_results.json"
    shapes, photos = str(folders / "shapes"), str(folders / "photos")
    assert eval_main(["--checkpoint", align_dir, "--task", "zeroshot", "--dataset", shapes, "--templates", "en",
                      "--batch-size", "8", "--output", str(output)]) == 0
    table = _lines(capsys.readouterr().out)
    assert table[0].split() == ["evaluation", "top1", "top5", "mean_per_class_recall", "images", "classes",
                                "skipped_images"], table
    assert table[1].split()[-3:] == ["8", "3", "0"], f"8 images of 3 classes, none skipped: {table}"
    assert table[1].split()[0] == "zeroshot/shapes/en" and len(table) == 2, table
    assert len({len(line) for line in table}) == 1, f"table columns not aligned:\n{table}"
    expected_zeroshot = evaluate_zeroshot(model, processor, load_dataset(shapes, "zeroshot"),
                                          templates=get_templates("en"), batch_size=8)
    none_skipped = {"skipped_images": {"count": 0, "examples": []}}
    expected_zeroshot = {**expected_zeroshot, "images": 8, "classes": 3, **none_skipped}
    assert json.loads(output.read_text()) == {"zeroshot/shapes/en": expected_zeroshot}

    # clip_benchmark's task name, an alias of "retrieval".
    assert eval_main(["--checkpoint", align_dir, "--task", "zeroshot_retrieval", "--dataset", photos,
                      "--batch-size", "8", "--output", str(output)]) == 0
    table = _lines(capsys.readouterr().out)
    assert table[0].split() == ["evaluation", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mr",
                                "images", "texts", "skipped_images"]
    expected_retrieval = evaluate_retrieval(model, processor, load_dataset(photos, "retrieval"), batch_size=8)
    assert f"{expected_retrieval['mr']:.2f}" == table[1].split()[-4], table
    assert table[1].split()[-3:] == ["5", "7", "0"], f"5 images with 7 captions, none skipped: {table}"
    expected_retrieval = {**expected_retrieval, "images": 5, "texts": 7, **none_skipped}
    # Results accumulate in the file, as in a training workdir's eval_results.json.
    assert json.loads(output.read_text()) == {"zeroshot/shapes/en": expected_zeroshot,
                                              "retrieval/photos/en": expected_retrieval}
    assert sorted(os.listdir(output.parent)) == ["eval_results.json"], "temporary files left behind"


def test_format_table():
    table = format_table({"retrieval/a/en": {"t2i_r1": 5.0, "mr": 12.345, "images": 12, "texts": 60},
                          "retrieval/bb/zh": {"t2i_r1": 100.0, "images": 3}})
    assert table.splitlines() == [
        "evaluation       t2i_r1     mr  images  texts",
        "retrieval/a/en     5.00  12.35      12     60",
        "retrieval/bb/zh  100.00      -       3      -",
    ], table


def test_eval_writes_clip_benchmark_layout(align_dir, align, folders, tmp_path, capsys):
    model, processor = align
    shapes, photos = str(folders / "shapes"), str(folders / "photos")
    zeroshot, retrieval = tmp_path / "zeroshot.json", tmp_path / "retrieval.json"
    assert eval_main(["--checkpoint", align_dir, "--task", "zeroshot_classification", "--dataset", shapes,
                      "--templates", "en", "--batch-size", "8", "--output", str(zeroshot),
                      "--output-format", "clip_benchmark"]) == 0
    expected = evaluate_zeroshot(model, processor, load_dataset(shapes, "zeroshot"), templates=get_templates("en"),
                                 batch_size=8)
    # Three classes: clip_benchmark has no top-5 accuracy there.
    assert json.loads(zeroshot.read_text()) == {
        "dataset": "shapes", "model": "align", "pretrained": align_dir, "task": "zeroshot_classification",
        "language": "en",
        "metrics": {"acc1": expected["top1"] / 100, "acc5": None,
                    "mean_per_class_recall": expected["mean_per_class_recall"] / 100},
    }, zeroshot.read_text()

    assert eval_main(["--checkpoint", align_dir, "--task", "retrieval", "--dataset", photos, "--batch-size", "8",
                      "--output", str(retrieval), "--output-format", "clip_benchmark"]) == 0
    expected = evaluate_retrieval(model, processor, load_dataset(photos, "retrieval"), batch_size=8)
    written = json.loads(retrieval.read_text())
    assert written["task"] == "zeroshot_retrieval" and written["dataset"] == "photos", written
    assert written["metrics"] == {
        **{f"image_retrieval_recall@{k}": expected[f"t2i_r{k}"] / 100 for k in (1, 5, 10)},
        **{f"text_retrieval_recall@{k}": expected[f"i2t_r{k}"] / 100 for k in (1, 5, 10)},
    }, written
    capsys.readouterr()

    # An altjax results file is not replaced by a clip_benchmark one, nor the reverse.
    altjax_results = tmp_path / "eval_results.json"
    altjax_results.write_text('{"zeroshot/x/en": {"top1": 1.0}}')
    for output, fmt, message in ((altjax_results, "clip_benchmark", "is not a clip_benchmark result"),
                                 (retrieval, "altjax", "is not a JSON object of evaluations")):
        before = output.read_text()
        with pytest.raises(SystemExit) as exit_info:
            eval_main(["--checkpoint", align_dir, "--task", "retrieval", "--dataset", photos, "--output", str(output),
                       "--output-format", fmt])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, f"--output-format {fmt} on {output.name}: {err!r}"
        assert output.read_text() == before, f"{output.name} was overwritten"
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--checkpoint", align_dir, "--task", "retrieval", "--dataset", photos,
                   "--output-format", "clip_benchmark"])
    assert exit_info.value.code == 2 and "needs --output" in capsys.readouterr().err


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0, f"--help exit status {exit_info.value.code}"
    return " ".join(capsys.readouterr().out.split())


def test_help_names_the_tasks_datasets_and_exit_statuses(capsys):
    from altjax.evaluation.datasets import TFDS_DATASETS

    text = _help(eval_main, capsys)
    wanted = ["zeroshot", "retrieval", *cli.TASK_ALIASES, "scenes", *TFDS_DATASETS, "clip_benchmark", "--verbose",
              "Hugging Face Hub id", "acc1", "image_retrieval_recall@K", "images", "classes", "texts"]
    wanted += [f"{code} {text.split()[0]}" for code, text in cli.EXIT_CODES.items()]
    missing = [word for word in wanted if word not in text]
    assert not missing, f"altjax-eval --help lacks {missing}:\n{text}"
    text = _help(embed_main, capsys)
    wanted = ["--verbose", "Hugging Face Hub id", cli.INDEX_FILE, cli.IMAGE_EMBEDS_FILE, cli.TEXT_EMBEDS_FILE]
    wanted += [f"{code} {text.split()[0]}" for code, text in cli.EXIT_CODES.items()]
    missing = [word for word in wanted if word not in text]
    assert not missing, f"altjax-embed --help lacks {missing}:\n{text}"


# What the libraries under altjax print as a command prepares the scenes set: tfds on stdout, absl on
# stderr. A command shows none of it unless --verbose.
TFDS_STDOUT = "Downloading and preparing dataset"
ABSL_STDERR = ("has no dataset_info.json", "INFO absl: Generating dataset altjax_scenes")


def test_third_party_messages_only_with_verbose(align_dir, tmp_path):
    runs = {}
    for flags in ([], ["--verbose"]):
        # A new data directory each time, so that tfds generates the scenes set (and says so).
        data_dir = tmp_path / f"tfds{len(flags)}"
        runs[bool(flags)] = subprocess.run(
            [str(VENV_BIN / "altjax-eval"), "--checkpoint", align_dir, "--task", "zeroshot", "--dataset", "scenes",
             "--data-dir", str(data_dir), "--batch-size", "500", *flags],
            capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    for verbose, run in runs.items():
        assert run.returncode == 0, f"verbose={verbose}: exit {run.returncode}\n{run.stderr[-3000:]}"
        assert run.stdout.splitlines()[-1].startswith("zeroshot/scenes/en"), f"no table: {run.stdout!r}"
    quiet, verbose = runs[False], runs[True]
    noise = [m for m in (TFDS_STDOUT, *ABSL_STDERR) if m in quiet.stdout + quiet.stderr]
    assert not noise, f"third-party messages without --verbose: {noise}\nstdout {quiet.stdout!r}\n{quiet.stderr}"
    assert "embedding images: 1000/1000 images (100%)" in quiet.stderr, f"progress missing: {quiet.stderr!r}"
    assert TFDS_STDOUT in verbose.stdout, f"--verbose hides tfds: {verbose.stdout!r}"
    hidden = [m for m in ABSL_STDERR if m not in verbose.stderr]
    assert not hidden, f"--verbose hides {hidden}: {verbose.stderr[-3000:]}"


def _bad_model_type(tmp_path):
    directory = tmp_path / "bert"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(directory)


def _templates_without_placeholder(tmp_path):
    (tmp_path / "templates.txt").write_text("a photo\n")
    return ["--templates", str(tmp_path / "templates.txt")]


EVAL_ERRORS = {
    "missing checkpoint": (lambda d, f, t: ["--checkpoint", str(t / "nowhere"), "--task", "zeroshot",
                                            "--dataset", str(f / "shapes")], r"nowhere: not a directory"),
    "bad model_type": (lambda d, f, t: ["--checkpoint", _bad_model_type(t), "--task", "zeroshot",
                                        "--dataset", str(f / "shapes")],
                       r"bert: model_type is 'bert', expected 'align' or 'altclip' or 'clip'"),
    "unknown dataset": (lambda d, f, t: ["--checkpoint", d, "--task", "retrieval", "--dataset", "flickr30k"],
                        r"unknown dataset 'flickr30k': not a directory, and not one of scenes, altjax_scenes, "),
    "unprepared tfds": (lambda d, f, t: ["--checkpoint", d, "--task", "zeroshot", "--dataset", "cifar10",
                                         "--data-dir", str(t / "tfds")],
                        r"tfds dataset 'cifar10' is not prepared in .*tfds/cifar10"),
    "no captions": (lambda d, f, t: ["--checkpoint", d, "--task", "retrieval", "--dataset", str(f / "shapes")],
                    r"shapes: no captions file \(captions.jsonl or captions.tsv\) for retrieval"),
    "bad templates": (lambda d, f, t: ["--checkpoint", d, "--task", "zeroshot", "--dataset", str(f / "shapes"),
                                       *_templates_without_placeholder(t)],
                      r"templates.txt, line 1: template 'a photo' has no '\{\}' placeholder"),
    "templates for retrieval": (lambda d, f, t: ["--checkpoint", d, "--task", "retrieval", "--dataset",
                                                 str(f / "photos"), "--templates", "en"],
                                r"--templates and --classnames apply to --task zeroshot only"),
}


@pytest.mark.parametrize("case", list(EVAL_ERRORS))
def test_eval_errors(case, align_dir, folders, tmp_path, capsys):
    make_args, message = EVAL_ERRORS[case]
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        eval_main([*make_args(align_dir, folders, tmp_path), "--output", str(output)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, f"{case}: exit status {exit_info.value.code}"
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("altjax-eval: error: "), f"{case}: stderr {captured.err!r}"
    assert re.search(message, lines[0]), f"{case}: {lines[0]!r} does not match {message!r}"
    assert captured.out == "" and not output.exists(), f"{case}: output written on error"


def test_eval_keeps_a_foreign_output_file(align_dir, folders, tmp_path, capsys):
    output = tmp_path / "notes.json"
    output.write_text("not json")
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--checkpoint", align_dir, "--task", "zeroshot", "--dataset", str(folders / "shapes"),
                   "--templates", "en", "--batch-size", "8", "--output", str(output)])
    assert exit_info.value.code == 2 and "not valid JSON" in capsys.readouterr().err
    assert output.read_text() == "not json", "an unrelated file was overwritten"


def test_console_scripts(tmp_path):
    """The installed entry points (pip install -e) report expected errors in one line, status 2."""
    for script, args, message in (
        ("altjax-eval", ["--checkpoint", str(tmp_path / "missing"), "--task", "retrieval", "--dataset", "x"],
         f"altjax-eval: error: {tmp_path / 'missing'}: not a directory"),
        ("altjax-embed", ["--index", str(tmp_path), "--query", "a cat"],
         f"altjax-embed: error: {tmp_path}: not an altjax-embed index (no index.json)"),
    ):
        run = subprocess.run([str(VENV_BIN / script), *args], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert run.returncode == 2 and run.stderr.strip() == message and run.stdout == "", \
            f"{script}: status {run.returncode}, stderr {run.stderr!r}"


def test_embed_build_search_and_overwrite(align_dir, align, folders, tmp_path, capsys):
    model, processor = align
    texts_file = tmp_path / "texts.txt"
    texts = ["a red square", "a green circle", "a blue star", "something else entirely"]
    texts_file.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    images_dir = folders / "shapes"
    out = tmp_path / "index"
    assert embed_main(["--checkpoint", align_dir, "--images", str(images_dir), "--texts", str(texts_file),
                       "--out", str(out), "--batch-size", "8"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 8 images, 4 texts (40-d embeddings) to {out}"
    assert sorted(os.listdir(out)) == ["image_embeds.npy", "index.json", "text_embeds.npy"]
    assert sorted(os.listdir(tmp_path)) == ["index", "texts.txt"], "temporary directory left behind"
    index = json.loads((out / "index.json").read_text())
    images = sorted(f"{c}/{i}.png" for c, n in (("red_square", 3), ("green_circle", 2), ("blue_star", 3))
                    for i in range(n))
    assert index["images"] == images and index["texts"] == texts and index["dim"] == 40
    assert index["skipped_images"] == {"count": 0, "examples": []}, index["skipped_images"]
    assert index["model_type"] == "align" and index["checkpoint"] == os.path.abspath(align_dir)
    image_embeds, text_embeds = np.load(out / "image_embeds.npy"), np.load(out / "text_embeds.npy")
    embedder = Embedder(model, processor, batch_size=8)
    assert image_embeds.dtype == np.float32 and text_embeds.dtype == np.float32
    assert_close(image_embeds, embedder.embed_images([str(images_dir / p) for p in images]), atol=0,
                 what="image_embeds.npy vs Embedder")
    assert_close(text_embeds, embedder.embed_texts(texts), atol=0, what="text_embeds.npy vs Embedder")

    # Search with a text (the checkpoint comes from the index).
    assert embed_main(["--index", str(out), "--query", "a red square", "--top-k", "3"]) == 0
    sections = capsys.readouterr().out.strip().split("\n\n")
    query = embedder.embed_texts(["a red square"])[0].astype(np.float64)
    for section, kind, embeds in zip(sections, ("images", "texts"), (image_embeds, text_embeds)):
        lines = section.splitlines()
        assert lines[0] == f'top 3 {kind} of {len(embeds)} for "a red square":', lines[0]
        scores = embeds.astype(np.float64) @ query
        best = np.argsort(-scores, kind="stable")[:3]
        for rank, (line, row) in enumerate(zip(lines[1:], best), start=1):
            got_rank, got_score, got_name = line.split(maxsplit=2)
            assert int(got_rank) == rank and got_name == index[kind][row], f"{kind} rank {rank}: {line!r}"
            assert abs(float(got_score) - scores[row]) <= 1e-4, f"{kind} rank {rank}: score {got_score} vs {scores[row]}"
    assert sections[1].splitlines()[1].endswith(" a red square"), "the identical text is not the best match"

    # Search with one of the indexed images: it finds itself, at cosine 1.
    assert embed_main(["--index", str(out), "--checkpoint", align_dir, "--query-image",
                       str(images_dir / "green_circle" / "1.png"), "--top-k", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[2] == "green_circle/1.png" and abs(float(first[1]) - 1.0) <= 1e-4, first

    # An existing index is kept unless --overwrite; --overwrite replaces it whole.
    before = (out / "index.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        embed_main(["--checkpoint", align_dir, "--texts", str(texts_file), "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and err == [f"altjax-embed: error: {out} exists; pass --overwrite to replace it"], err
    assert (out / "index.json").read_text() == before
    assert embed_main(["--checkpoint", align_dir, "--texts", str(texts_file), "--out", str(out), "--overwrite",
                       "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(out)) == ["index.json", "text_embeds.npy"], "the old index was not replaced whole"
    assert sorted(os.listdir(tmp_path)) == ["index", "texts.txt"], "old index or temporary left behind"

    # --overwrite never replaces a directory that is not an index.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        embed_main(["--checkpoint", align_dir, "--texts", str(texts_file), "--out", str(other), "--overwrite"])
    assert exit_info.value.code == 2 and "is not an altjax-embed index; not replacing it" in capsys.readouterr().err
    assert os.listdir(other) == ["keep.txt"]


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/o", "--images", "{tmp}/none"], "{tmp}/none: not a directory"),
    (["--out", "{tmp}/o"], "nothing to embed: pass --images FOLDER and/or --texts FILE"),
    (["--out", "{tmp}/o", "--texts", "{tmp}/empty.txt"], "{tmp}/empty.txt: no texts (no non-empty lines)"),
    (["--index", "{tmp}", "--query", "x"], "{tmp}: not an altjax-embed index (no index.json)"),
    (["--index", "{tmp}/o2"], "--index needs --query TEXT or --query-image PATH"),
])
def test_embed_errors(args, message, align_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "o2").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        embed_main(["--checkpoint", align_dir, *args])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and err == [f"altjax-embed: error: {message.format(tmp=tmp_path)}"], err
    assert not (tmp_path / "o").exists(), "an output directory was created on error"


def test_embed_altclip(folders, tmp_path, capsys):
    """An AltCLIP directory (model_type altclip) goes to AltCLIPModel / AltCLIPProcessor; the
    embeddings equal the model called directly. Its 40 positions need --text-length below 77."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from altjax import AltCLIPModel, AltCLIPProcessor
    from helpers import tiny_hf_dir

    model_dir = tmp_path / "altclip"
    tiny_hf_dir(str(model_dir), "altclip")
    texts_file = tmp_path / "texts.txt"
    texts = ["a photo of a cat", "un chat", "a dog", "的猫"]
    texts_file.write_text("\n".join(texts) + "\n")
    out = tmp_path / "index"
    images_dir = folders / "photos"
    assert embed_main(["--checkpoint", str(model_dir), "--images", str(images_dir), "--texts", str(texts_file),
                       "--out", str(out), "--batch-size", "8", "--text-length", "24"]) == 0
    capsys.readouterr()
    index = json.loads((out / "index.json").read_text())
    assert index["model_type"] == "altclip" and index["text_length"] == 24

    model, processor = AltCLIPModel.from_pretrained(model_dir), AltCLIPProcessor.from_pretrained(model_dir)
    paths = [str(images_dir / p) for p in index["images"]]
    inputs = processor(text=texts, images=[Image.open(p) for p in paths], padding="max_length", truncation=True,
                       max_length=24)
    graphdef, state = nnx.split(model)
    direct = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))(state, {k: jnp.asarray(v) for k, v in inputs.items()})
    assert_close(np.load(out / "image_embeds.npy"), direct.image_embeds, atol=1e-6, what="AltCLIP image_embeds.npy vs model")
    assert_close(np.load(out / "text_embeds.npy"), direct.text_embeds, atol=1e-6, what="AltCLIP text_embeds.npy vs model")


# --- unreadable images: skipped and counted, or fatal with --strict-images ----------------------------


def test_eval_and_embed_clip(folders, tmp_path, capsys):
    """A CLIP directory (model_type clip) goes to CLIPModel / CLIPProcessor in both tools: altjax-eval
    scores it, and altjax-embed's embeddings equal the model called directly (its 16 positions cap
    the text length)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from altjax import CLIPModel, CLIPProcessor
    from helpers import tiny_hf_dir

    model_dir = tmp_path / "clip"
    tiny_hf_dir(str(model_dir), "clip")
    assert eval_main(["--checkpoint", str(model_dir), "--task", "zeroshot", "--dataset", str(folders / "shapes"),
                      "--templates", "en", "--batch-size", "8"]) == 0
    table = _lines(capsys.readouterr().out)
    assert table[1].split()[0] == "zeroshot/shapes/en", table

    texts = ["a photo of a cat", "a red bicycle", "two dogs"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out, images_dir = tmp_path / "index", folders / "photos"
    assert embed_main(["--checkpoint", str(model_dir), "--images", str(images_dir), "--texts",
                       str(tmp_path / "texts.txt"), "--out", str(out), "--batch-size", "8"]) == 0
    capsys.readouterr()
    index = json.loads((out / "index.json").read_text())
    assert index["model_type"] == "clip" and index["text_length"] == 16, index

    model, processor = CLIPModel.from_pretrained(model_dir), CLIPProcessor.from_pretrained(model_dir)
    paths = [str(images_dir / p) for p in index["images"]]
    inputs = processor(text=texts, images=[Image.open(p) for p in paths], padding="max_length", truncation=True,
                       max_length=16)
    graphdef, state = nnx.split(model)
    direct = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))(state, {k: jnp.asarray(v) for k, v in inputs.items()})
    assert_close(np.load(out / "image_embeds.npy"), direct.image_embeds, atol=1e-6, what="CLIP image_embeds.npy vs model")
    assert_close(np.load(out / "text_embeds.npy"), direct.text_embeds, atol=1e-6, what="CLIP text_embeds.npy vs model")


@pytest.fixture()
def damaged(folders, tmp_path):
    """Copies of the folders with unreadable images: in shapes, a 4th red square that is not an
    image and green circle 1 cut in half (7 of 9 readable); in photos, p1 cut in half."""
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(folders, root)
    (root / "shapes" / "red_square" / "3.png").write_bytes(b"this is not an image")
    for name in ("shapes/green_circle/1.png", "photos/p1.png"):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    shapes = [str(root / "shapes" / "green_circle" / "1.png"), str(root / "shapes" / "red_square" / "3.png")]
    return root, shapes, [str(root / "photos" / "p1.png")]


def test_eval_skips_and_counts_unreadable_images(align_dir, align, folders, damaged, tmp_path, capsys):
    from altjax.evaluation import ClassificationSet, RetrievalSet

    model, processor = align
    root, broken_shapes, broken_photos = damaged
    (tmp_path / "one.txt").write_text("a photo of a {}.\n")
    output = tmp_path / "results.json"
    assert eval_main(["--checkpoint", align_dir, "--task", "zeroshot", "--dataset", str(root / "shapes"),
                      "--templates", str(tmp_path / "one.txt"), "--batch-size", "16", "--output", str(output)]) == 0
    captured = capsys.readouterr()
    table = _lines(captured.out)
    assert table[0].split()[-1] == "skipped_images" and table[1].split()[-1] == "2", table
    warning = _lines(captured.err)
    assert len(warning) == 1 and warning[0].startswith("altjax-eval: warning: skipped 2 of 9 images that cannot "
                                                       "be read (pass --strict-images"), captured.err
    assert "Traceback" not in captured.err
    result = json.loads(output.read_text())["zeroshot/shapes/en"]
    skipped = result.pop("skipped_images")
    assert skipped["count"] == 2 and len(skipped["examples"]) == 2, skipped
    for path, example in zip(sorted(broken_shapes), sorted(skipped["examples"])):
        assert example.startswith(f"{path}: cannot read image ("), (path, example)
    # The metrics are those of the readable images alone: the original folder's 8 but green circle 1.
    original = load_dataset(str(folders / "shapes"), "zeroshot")
    keep = [i for i, p in enumerate(original.images) if not p.endswith("green_circle/1.png")]
    expected = evaluate_zeroshot(model, processor, ClassificationSet(
        "shapes", [original.images[i] for i in keep], original.labels[keep], original.class_names),
        templates=["a photo of a {}."], batch_size=16)
    # Counted: the 7 images read, of 3 classes.
    expected = {**expected, "images": 7, "classes": 3}
    assert result == expected, f"{result} != metrics of the readable images {expected}"

    assert eval_main(["--checkpoint", align_dir, "--task", "retrieval", "--dataset", str(root / "photos"),
                      "--batch-size", "8", "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert _lines(captured.out)[1].split()[-1] == "1" and "skipped 1 of 5 images" in captured.err, captured
    result = json.loads(output.read_text())["retrieval/photos/en"]
    assert result.pop("skipped_images")["examples"][0].startswith(f"{broken_photos[0]}: cannot read image ("), result
    # Image p1 and its two captions are left out: the set of the other four.
    photos = load_dataset(str(folders / "photos"), "retrieval")
    keep = [i for i in range(5) if i != 1]
    texts = [(t, keep.index(i)) for t, i in zip(photos.texts, photos.text_image_ids) if i != 1]
    expected = evaluate_retrieval(model, processor, RetrievalSet("photos", [photos.images[i] for i in keep],
                                                                 [t for t, _ in texts], [i for _, i in texts]),
                                  batch_size=8)
    expected = {**expected, "images": 4, "texts": len(texts)}
    assert result == expected, f"{result} != metrics without the unreadable image {expected}"


def test_eval_strict_images_is_one_line_and_exit_2(align_dir, damaged, tmp_path, capsys):
    root, _, broken_photos = damaged
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--checkpoint", align_dir, "--task", "retrieval", "--dataset", str(root / "photos"),
                   "--batch-size", "8", "--output", str(output), "--strict-images"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"altjax-eval: error: {broken_photos[0]}: cannot read image (") and lines[0].endswith(")"), lines
    assert captured.out == "" and not output.exists(), "output written on error"


def test_eval_strict_images_from_the_console_script(align_dir, damaged, tmp_path):
    root, broken_shapes, _ = damaged
    (tmp_path / "one.txt").write_text("a {}\n")
    run = subprocess.run([str(VENV_BIN / "altjax-eval"), "--checkpoint", align_dir, "--task", "zeroshot",
                          "--dataset", str(root / "shapes"), "--templates", str(tmp_path / "one.txt"),
                          "--batch-size", "16", "--strict-images"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert re.fullmatch(rf"altjax-eval: error: ({'|'.join(map(re.escape, broken_shapes))}): cannot read image \(.+\)",
                        lines[0]), lines[0]


def test_embed_skips_and_counts_unreadable_images(align_dir, align, damaged, tmp_path, capsys):
    model, processor = align
    root, broken_shapes, _ = damaged
    out = tmp_path / "index"
    assert embed_main(["--checkpoint", align_dir, "--images", str(root / "shapes"), "--out", str(out),
                       "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote 7 images (40-d embeddings) to {out}; skipped 2 unreadable images", captured.out
    assert _lines(captured.err)[0].startswith("altjax-embed: warning: skipped 2 of 9 images"), captured.err
    index = json.loads((out / "index.json").read_text())
    assert index["skipped_images"]["count"] == 2 and len(index["images"]) == 7, index
    assert sorted(e.split(": cannot read image (")[0] for e in index["skipped_images"]["examples"]) == sorted(broken_shapes)
    embeds = np.load(out / "image_embeds.npy")
    assert embeds.shape == (7, 40) and np.isfinite(embeds).all(), embeds.shape
    readable = Embedder(model, processor, batch_size=16).embed_images([str(root / "shapes" / p) for p in index["images"]])
    assert_close(embeds, readable, atol=1e-6, what="embeddings of the readable images")

    # --strict-images: one line, exit 2, nothing written; an unreadable --query-image likewise.
    with pytest.raises(SystemExit) as exit_info:
        embed_main(["--checkpoint", align_dir, "--images", str(root / "shapes"), "--out", str(tmp_path / "strict"),
                    "--batch-size", "16", "--strict-images"])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"altjax-embed: error: ({'|'.join(map(re.escape, broken_shapes))}): cannot read image \(.+\)",
                        lines[0]), lines[0]
    assert not (tmp_path / "strict").exists()
    with pytest.raises(SystemExit) as exit_info:
        embed_main(["--index", str(out), "--query-image", broken_shapes[0]])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and lines == [lines[0]] and lines[0].startswith(
        f"altjax-embed: error: {broken_shapes[0]}: cannot read image ("), lines
    # Nothing readable at all: one line.
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as exit_info:
        embed_main(["--checkpoint", align_dir, "--images", str(empty), "--out", str(tmp_path / "o")])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith(f"altjax-embed: error: {empty}: none of the 1 images "
                                                              "can be read (the first: "), lines


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_results_and_indexes_follow_the_umask(tmp_path, umask):
    """Colleagues on a shared filesystem read what altjax-eval and altjax-embed wrote."""
    previous = os.umask(umask)
    try:
        results.write_results(str(tmp_path / "results.json"), {"retrieval/x/en": {"t2i_r1": 1.0}})
        cli.write_index(str(tmp_path / "index"), {"format": cli.INDEX_FORMAT}, {"image_embeds": np.zeros(2)})
    finally:
        os.umask(previous)
    modes = {os.path.relpath(os.path.join(root, name), tmp_path): os.stat(os.path.join(root, name)).st_mode & 0o777
             for root, dirs, files in os.walk(tmp_path) for name in dirs + files}
    want = {"results.json": 0o666 & ~umask, "index": 0o777 & ~umask, "index/index.json": 0o666 & ~umask,
            "index/image_embeds.npy": 0o666 & ~umask}
    assert modes == want, f"umask {umask:o}: modes {({k: oct(v) for k, v in modes.items()})}"
