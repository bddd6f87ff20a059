"""Command lines: ``altjax-eval`` (zero-shot / retrieval metrics) and ``altjax-embed`` (embed and search).

``altjax-eval --checkpoint DIR --task zeroshot|retrieval --dataset NAME`` (clip_benchmark's task names
zeroshot_classification and zeroshot_retrieval are aliases) prints a table of the metrics and the
counts evaluated and, with ``--output FILE.json``, merges ``{"<task>/<dataset>/<lang>": metrics}``
into that file (the format of a training workdir's ``eval_results.json``), or with
``--output-format clip_benchmark`` writes the one evaluation as clip_benchmark does
(:func:`~altjax.evaluation.results.clip_benchmark_result`).

``altjax-embed --checkpoint DIR [--images FOLDER] [--texts FILE] --out OUTDIR`` writes
``image_embeds.npy`` / ``text_embeds.npy`` (L2-normalised float32, one row per image / text line)
and ``index.json`` (the rows' image paths and texts, the model, the dimension). ``altjax-embed
--index OUTDIR --query TEXT`` (or ``--query-image PATH``) prints the best matches among both.

Unreadable images (a corrupt or truncated file) are skipped and counted by both tools: the count
and a few examples are printed (a ``skipped_images`` column of altjax-eval's table, a line of
altjax-embed's summary, a warning on stderr) and written to the JSON (``"skipped_images":
{"count": n, "examples": [...]}`` in each evaluation of ``--output``, and in ``index.json``).
With ``--strict-images`` the first one is an error instead:
``<prog>: error: <file>: cannot read image (<reason>)``, exit status 2.

Expected failures (a missing or wrong checkpoint, an unknown or unprepared dataset, an existing
output) print one ``<prog>: error: ...`` line and exit with status 2 (:data:`EXIT_CODES`). The
libraries under altjax keep their INFO and WARNING messages to themselves unless ``--verbose``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from altjax import console, fsutil, hub
from altjax.evaluation.results import (check_clip_benchmark_file, clip_benchmark_result, read_results,
                                       write_clip_benchmark, write_results)
from altjax.models import registry

INDEX_FILE = "index.json"
IMAGE_EMBEDS_FILE = "image_embeds.npy"
TEXT_EMBEDS_FILE = "text_embeds.npy"
INDEX_FORMAT = "altjax-embed/1"
DTYPES = ("float32", "bfloat16")
SKIPPED_IMAGES = "skipped_images"
STRICT_IMAGES_HELP = ("an unreadable image (a corrupt file) is an error, exit status 2; by default it is "
                      "skipped, counted and reported")
CHECKPOINT_HELP = "model directory or Hugging Face Hub id (HF or altjax)"
EXIT_CODES = {
    0: "done",
    1: "an unexpected error: a bug of altjax, reported with a traceback",
    2: "a mistake in the command, the checkpoint, the dataset, an image (--strict-images) or the output, "
       "reported in one line",
}


class CommandError(Exception):
    """An expected failure, reported as one line and exit status 2."""


def load_checkpoint(path: str, *, dtype: str = "float32"):
    """``(model, processor, model_type)`` of a model directory of any registered kind
    (``altjax.models.registry``, by config.json's ``model_type``); the processor's files come from
    the same directory."""
    import jax.numpy as jnp

    kind = registry.of_directory(path)
    model = kind.model.from_pretrained(path, dtype=jnp.dtype(dtype))
    try:
        processor = kind.processor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(f"{path}: cannot load the {kind.processor.__name__} (tokenizer and image settings): "
                           f"{_one_line(e)}") from None
    return model, processor, kind.model_type


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _run(parser: argparse.ArgumentParser, command, args) -> int:
    # Only the anticipated failures become one-line errors; anything else is a bug and keeps its
    # traceback.
    try:
        return command(args)
    except (CommandError, OSError, ValueError) as e:
        # ValueError covers CheckpointError, DatasetError, ConversionError (weights that do not
        # fit), template files without {}, images that preprocess to different shapes: messages
        # written for the user.
        parser.exit(2, f"{parser.prog}: error: {_one_line(e)}\n")


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


# --- altjax-eval ---------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "count" in value:  # skipped_images: the count
        return str(value["count"])
    if isinstance(value, int):  # the counts evaluated
        return str(value)
    return f"{value:.2f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One aligned row per evaluation, one column per metric (percentages, 2 decimals; the counts
    evaluated, ``images`` and ``classes`` or ``texts``, and the ``skipped_images`` column give
    numbers of items)."""
    metrics = list(dict.fromkeys(k for values in results.values() for k in values))
    header = ["evaluation", *metrics]
    rows = [[name, *(_cell(values[m]) if m in values else "-" for m in metrics)]
            for name, values in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    return "\n".join(line(row) for row in [header, *rows])


# clip_benchmark's task names, which researchers compare altjax's figures against.
TASK_ALIASES = {"zeroshot_classification": "zeroshot", "zeroshot_retrieval": "retrieval"}
OUTPUT_FORMATS = ("altjax", "clip_benchmark")


def _eval_epilog() -> str:
    from altjax.evaluation.datasets import SCENES_NAMES, TFDS_DATASETS

    def datasets(task: str) -> str:
        return ", ".join([SCENES_NAMES[0], *sorted(n for n, spec in TFDS_DATASETS.items() if spec.task == task)])

    aliases = ", ".join(f"{alias} ({task})" for alias, task in TASK_ALIASES.items())
    return "\n\n".join([
        console.help_section("tasks", f"zeroshot (classification: top1, top5, mean_per_class_recall), retrieval "
                                      f"(R@1/5/10 text->image and image->text, their mean mr); clip_benchmark's "
                                      f"names: {aliases}"),
        console.help_section(
            "datasets",
            f"zeroshot: {datasets('zeroshot')}, or a folder with one subfolder of images per class; "
            f"retrieval: {datasets('retrieval')}, or a folder of images with captions.jsonl or captions.tsv. "
            "'scenes' is altjax's embedded dataset, generated on first use; the tfds datasets must be prepared "
            "in --data-dir (nothing is downloaded)."),
        console.help_section(
            "output",
            "the table gives percentages and the counts evaluated (images, and classes or texts); --output merges "
            "{\"<task>/<dataset>/<lang>\": metrics} into a JSON file (a training run's eval_results.json format), "
            "or with --output-format clip_benchmark writes clip_benchmark's layout: {dataset, model, pretrained, "
            "task, metrics (fractions: acc1, acc5, mean_per_class_recall or image_retrieval_recall@K, "
            "text_retrieval_recall@K), language}."),
        console.exit_status_help(EXIT_CODES),
    ])


def _eval_parser() -> argparse.ArgumentParser:
    from altjax.evaluation.embed import DEFAULT_BATCH_SIZE

    parser = argparse.ArgumentParser(
        prog="altjax-eval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_eval_epilog(),
        description="Zero-shot classification or image-text retrieval metrics of an ALIGN, AltCLIP or CLIP checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help=CHECKPOINT_HELP)
    parser.add_argument("--task", required=True, choices=("zeroshot", "retrieval", *TASK_ALIASES),
                        help="zeroshot or retrieval (clip_benchmark's zeroshot_classification and "
                             "zeroshot_retrieval are accepted as aliases)")
    parser.add_argument("--dataset", required=True, metavar="NAME",
                        help="an image folder, 'scenes', or a prepared tfds dataset (below)")
    parser.add_argument("--split", help="dataset split (default: its test split)")
    parser.add_argument("--lang", default="en", help="language of captions, class names and templates (en, zh)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="global batch size")
    parser.add_argument("--text-length", type=int, help="tokens per text (default: the processor's, else 77)")
    parser.add_argument("--templates", metavar="NAME|FILE",
                        help="zero-shot prompt templates: a built-in set (openai_imagenet, "
                             "openai_imagenet_selected, en, zh) or a file, one template with {} per line")
    parser.add_argument("--classnames", metavar="FILE", help="zero-shot class names, one per line")
    parser.add_argument("--data-dir", help="where the scenes set or tfds datasets are stored")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    parser.add_argument("--output", metavar="FILE.json", help="write the metrics to this JSON file (see output)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="altjax",
                        help="altjax: merge into an eval_results.json-style object (default); clip_benchmark: "
                             "one evaluation in clip_benchmark's layout, replacing an earlier one")
    parser.add_argument("--strict-images", action="store_true", help=STRICT_IMAGES_HELP)
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    return parser


def _warn_skipped(prog: str, skipped, total: int) -> None:
    """One stderr line about the images skipped as unreadable (none: nothing)."""
    if skipped is not None and skipped.count:
        more = f", ... ({skipped.count - len(skipped.examples)} more)" if skipped.count > len(skipped.examples) else ""
        print(f"{prog}: warning: skipped {skipped.count} of {total} images that cannot be read "
              f"(pass --strict-images to make this an error): {'; '.join(skipped.examples)}{more}", file=sys.stderr)


def _eval(args) -> int:
    args.task = TASK_ALIASES.get(args.task, args.task)
    from altjax.evaluation.datasets import load_dataset, read_class_names
    from altjax.evaluation.embed import (SkippedImages, evaluate_retrieval, evaluate_zeroshot, evaluated_counts,
                                         evaluation_key)
    from altjax.evaluation.templates import get_templates

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    if args.task == "retrieval" and (args.templates or args.classnames):
        raise CommandError("--templates and --classnames apply to --task zeroshot only")
    if args.output_format == "clip_benchmark" and not args.output:
        raise CommandError("--output-format clip_benchmark needs --output FILE.json")
    registry.of_directory(args.checkpoint)
    # An unusable output file fails now, not after the evaluation.
    if args.output and args.output_format == "clip_benchmark":
        check_clip_benchmark_file(args.output)
    elif args.output:
        read_results(args.output)
    templates = get_templates(args.templates) if args.templates else None
    class_names = read_class_names(args.classnames) if args.classnames else None
    with console.third_party_stdout():  # tfds announces a dataset it generates there
        dataset = load_dataset(args.dataset, args.task, split=args.split, lang=args.lang, data_dir=args.data_dir,
                               class_names=class_names)
    model, processor, model_type = load_checkpoint(args.checkpoint, dtype=args.dtype)
    skipped = None if args.strict_images else SkippedImages()
    options = dict(batch_size=args.batch_size, text_length=args.text_length, progress=True, skipped=skipped)
    if args.task == "zeroshot":
        metrics = evaluate_zeroshot(model, processor, dataset, templates=templates, **options)
    else:
        metrics = evaluate_retrieval(model, processor, dataset, **options)
    metrics = {**metrics, **evaluated_counts(dataset, skipped), SKIPPED_IMAGES: (skipped or SkippedImages()).as_dict()}
    results = {evaluation_key(args.task, dataset.name, dataset.lang): metrics}
    if _is_main_process():
        _warn_skipped("altjax-eval", skipped, len(dataset.images))
        print(format_table(results))
        if args.output and args.output_format == "clip_benchmark":
            write_clip_benchmark(args.output, clip_benchmark_result(
                args.task, metrics, dataset=dataset.name, model=model_type, pretrained=args.checkpoint,
                language=dataset.lang))
        elif args.output:
            write_results(args.output, results)
    return 0


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``altjax-eval``: evaluates a checkpoint on one dataset; returns the exit status."""
    parser = _eval_parser()
    args = parser.parse_args(argv)
    console.quiet_third_party(args.verbose)
    return _run(parser, _eval, args)


# --- altjax-embed --------------------------------------------------------------------------------


def read_texts(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, without their line endings."""
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise CommandError(f"cannot read texts from {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CommandError(f"{path}: not UTF-8 text ({e})") from None
    if not texts:
        raise CommandError(f"{path}: no texts (no non-empty lines)")
    return texts


def _check_output(out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise CommandError(f"{out} exists; pass --overwrite to replace it")
    # --overwrite replaces an earlier index (or an empty directory), never an arbitrary directory.
    if not os.path.isdir(out) or os.path.islink(out) or (os.listdir(out) and not os.path.isfile(os.path.join(out, INDEX_FILE))):
        raise CommandError(f"{out} exists and is not an altjax-embed index; not replacing it")


def write_index(out: str, index: dict[str, Any], arrays: dict[str, np.ndarray], *, overwrite: bool = False) -> None:
    """Writes ``index.json`` and the ``.npy`` arrays into ``out`` atomically: into a temporary
    sibling directory first, renamed into place when complete (replacing an old index when
    ``overwrite``)."""
    _check_output(out, overwrite)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = fsutil.make_temp_dir(parent, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    old = None
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, name), array)
        with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1, ensure_ascii=False)
            f.write("\n")
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".old", dir=parent)
            os.rename(out, os.path.join(old, "index"))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(out):
            os.rename(os.path.join(old, "index"), out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_index(directory: str) -> dict[str, Any]:
    """The ``index.json`` of an altjax-embed output directory."""
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        raise CommandError(f"{directory}: not an altjax-embed index (no {INDEX_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise CommandError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise CommandError(f"{path}: not an {INDEX_FORMAT} index")
    return index


def top_k(embeds: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` rows of ``embeds`` with the highest dot product with ``query``, best first
    (ties in row order), as ``(row, score)``."""
    scores = embeds.astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


def _embed_parser() -> argparse.ArgumentParser:
    from altjax.evaluation.embed import DEFAULT_BATCH_SIZE

    parser = argparse.ArgumentParser(
        prog="altjax-embed",
        description="Embed a folder of images and/or a file of texts (one per line) with an ALIGN, AltCLIP or CLIP "
                    "checkpoint, or search such an index with a text or an image.",
        epilog="build: altjax-embed --checkpoint DIR --images FOLDER --texts FILE --out OUTDIR\n"
               "search: altjax-embed --index OUTDIR --query 'a photo of a cat' [--top-k 5]\n\n"
               + console.help_section(
                   "output",
                   f"OUTDIR receives {IMAGE_EMBEDS_FILE} and {TEXT_EMBEDS_FILE} (L2-normalised float32, one row per "
                   f"image / text line) and {INDEX_FILE} (the rows' image paths and texts, the model, the dimension, "
                   "the images skipped as unreadable); a search prints the best matches among both.")
               + "\n\n" + console.exit_status_help(EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", metavar="DIR",
                        help=f"{CHECKPOINT_HELP}; with --index, default: the index's model")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", metavar="OUTDIR", help="write a new index here")
    mode.add_argument("--index", metavar="OUTDIR", help="search this index")
    parser.add_argument("--images", metavar="FOLDER", help="images to embed (searched recursively)")
    parser.add_argument("--texts", metavar="FILE", help="texts to embed, one per line (blank lines skipped)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--query", metavar="TEXT", help="text to search the index with")
    query.add_argument("--query-image", metavar="PATH", help="image to search the index with")
    parser.add_argument("--top-k", type=int, default=5, help="matches to print per modality (default 5)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="global batch size")
    parser.add_argument("--text-length", type=int, help="tokens per text (default: the processor's, else 77)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    parser.add_argument("--strict-images", action="store_true", help=STRICT_IMAGES_HELP)
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    return parser


def _build_index(args) -> int:
    from altjax.evaluation.datasets import list_images
    from altjax.evaluation.embed import Embedder, SkippedImages

    if not (args.images or args.texts):
        raise CommandError("nothing to embed: pass --images FOLDER and/or --texts FILE")
    if args.checkpoint is None:
        raise CommandError("--out needs --checkpoint")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    _check_output(args.out, args.overwrite)
    images = texts = None
    if args.images:
        if not os.path.isdir(args.images):
            raise CommandError(f"{args.images}: not a directory")
        images = list_images(args.images)
        if not images:
            raise CommandError(f"{args.images}: no image files")
    if args.texts:
        texts = read_texts(args.texts)
    model, processor, model_type = load_checkpoint(args.checkpoint, dtype=args.dtype)
    embedder = Embedder(model, processor, batch_size=args.batch_size, text_length=args.text_length, progress=True)
    arrays = {}
    # A Hub id stays an id (a later --index search resolves it again); a path is made absolute.
    checkpoint = args.checkpoint if hub.is_hub_id(args.checkpoint) and not os.path.exists(args.checkpoint) \
        else os.path.abspath(args.checkpoint)
    index: dict[str, Any] = {"format": INDEX_FORMAT, "checkpoint": checkpoint,
                             "model_type": model_type, "text_length": embedder.text_length}
    skipped = None
    if images is not None:
        skipped = None if args.strict_images else SkippedImages()
        embeds = embedder.embed_images([os.path.join(args.images, p) for p in images], skipped=skipped)
        if skipped is not None and skipped.count:
            if skipped.count == len(images):
                raise CommandError(f"{args.images}: none of the {len(images)} images can be read "
                                   f"(the first: {skipped.examples[0]})")
            keep = np.ones(len(images), bool)
            keep[skipped.indices] = False
            embeds, images = embeds[keep], [p for p, k in zip(images, keep) if k]
        arrays[IMAGE_EMBEDS_FILE] = embeds
        index["images_root"] = os.path.abspath(args.images)
        index["images"] = images
        index[SKIPPED_IMAGES] = (skipped or SkippedImages()).as_dict()
    if texts is not None:
        arrays[TEXT_EMBEDS_FILE] = embedder.embed_texts(texts)
        index["texts_file"] = os.path.abspath(args.texts)
        index["texts"] = texts
    index["dim"] = next(iter(arrays.values())).shape[1]
    if _is_main_process():
        write_index(args.out, index, arrays, overwrite=args.overwrite)
        if skipped is not None:
            _warn_skipped("altjax-embed", skipped, len(images) + skipped.count)
        counts = ", ".join(f"{len(index[k])} {k}" for k in ("images", "texts") if k in index)
        unread = f"; skipped {skipped.count} unreadable images" if skipped is not None and skipped.count else ""
        print(f"wrote {counts} ({index['dim']}-d embeddings) to {args.out}{unread}")
    return 0


def _search(args) -> int:
    from altjax.evaluation.embed import Embedder

    if args.images or args.texts or args.overwrite or args.strict_images:
        raise CommandError("--images, --texts, --overwrite and --strict-images build an index (--out), not search one")
    if not (args.query or args.query_image):
        raise CommandError("--index needs --query TEXT or --query-image PATH")
    if args.top_k < 1:
        raise CommandError(f"--top-k must be positive, got {args.top_k}")
    index = read_index(args.index)
    if args.query_image is not None and not os.path.isfile(args.query_image):
        raise CommandError(f"{args.query_image}: no such image file")
    checkpoint = args.checkpoint or index["checkpoint"]
    model, processor, _ = load_checkpoint(checkpoint, dtype=args.dtype)
    text_length = args.text_length or index.get("text_length")
    embedder = Embedder(model, processor, batch_size=1, text_length=text_length)
    if args.query is not None:
        query, label = embedder.embed_texts([args.query])[0], json.dumps(args.query, ensure_ascii=False)
    else:
        query, label = embedder.embed_images([args.query_image])[0], args.query_image
    if query.shape[0] != index["dim"]:
        raise CommandError(f"{checkpoint} gives {query.shape[0]}-d embeddings, the index holds {index['dim']}-d ones "
                           "(built with another model)")
    if not _is_main_process():
        return 0
    sections = []
    for kind, file in (("images", IMAGE_EMBEDS_FILE), ("texts", TEXT_EMBEDS_FILE)):
        if kind not in index:
            continue
        embeds = np.load(os.path.join(args.index, file))
        lines = [f"top {min(args.top_k, len(embeds))} {kind} of {len(embeds)} for {label}:"]
        lines += [f"  {rank:>3}  {score:7.4f}  {index[kind][row]}"
                  for rank, (row, score) in enumerate(top_k(embeds, query, args.top_k), start=1)]
        sections.append("\n".join(lines))
    print("\n\n".join(sections))
    return 0


def embed_main(argv: Optional[Sequence[str]] = None) -> int:
    """``altjax-embed``: builds an embedding index, or searches one; returns the exit status."""
    parser = _embed_parser()
    args = parser.parse_args(argv)
    console.quiet_third_party(args.verbose)
    return _run(parser, _build_index if args.out else _search, args)

