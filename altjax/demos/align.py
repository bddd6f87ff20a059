"""The main job: train a tiny ALIGN from scratch on the embedded scenes dataset and watch it learn.

    python -m altjax.demos.align [--workdir altjax-demo] [--steps N] [--config.KEY=VALUE ...]

Generates the ``altjax_scenes`` dataset (synthetic scenes with English captions, no download),
evaluates a randomly initialised tiny ALIGN (``configs/demo.py``) on the test split -- zero-shot
classification of the 24 colour-shape classes and image-text retrieval over 1,000 pairs --
trains it (a few minutes on a laptop CPU), evaluates it again, and prints the results side by side
with chance. The workdir receives what ``altjax-train`` writes (``metrics.jsonl``,
``eval_results.json``, checkpoints, TensorBoard events, the model in ``model/``), the evaluation
before training in ``eval_before.json``, and ``demo.png``: the loss curve, for a few test captions
the images the trained model retrieves (the caption's own image framed in green, with a legend),
and the results table. Run again on the same workdir, it resumes (or,
when finished, only reports). The last line names the trained model and how to load it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from altjax import console, train
from altjax.data import scenes
from altjax.evaluation import Embedder
from altjax.models.align import AlignModel
from altjax.processing import AlignProcessor

RETRIEVAL_EXAMPLES = 4  # test captions shown in the figure
TOP_K = 4  # images retrieved per caption in the figure
CORRECT, OTHER = (45, 165, 65), (160, 160, 160)  # frames of the retrieved images in the figure

ROWS = (  # (label, evaluation, metric, chance as a function of the test set)
    ("text->image R@1", "retrieval", "t2i_r1", lambda n, c: 100 / n),
    ("text->image R@5", "retrieval", "t2i_r5", lambda n, c: 500 / n),
    ("image->text R@1", "retrieval", "i2t_r1", lambda n, c: 100 / n),
    ("image->text R@5", "retrieval", "i2t_r5", lambda n, c: 500 / n),
    ("zero-shot top-1", "zeroshot", "top1", lambda n, c: 100 / c),
    ("zero-shot top-5", "zeroshot", "top5", lambda n, c: 500 / c),
)


def results_table(before: dict, after: dict, num_test: int, num_classes: int) -> str:
    """The before/after/chance table (percentages) of the scenes test evaluations."""
    lines = [f"{'':<18}{'chance':>9}{'before':>9}{'after':>9}"]
    for label, task, metric, chance in ROWS:
        key = f"{task}/scenes/en"
        lines.append(f"{label:<18}{chance(num_test, num_classes):>8.1f}%"
                     f"{before[key][metric]:>8.1f}%{after[key][metric]:>8.1f}%")
    return "\n".join(lines)


# ----- the figure -----

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_loss(draw, box: tuple[int, int, int, int], steps, losses) -> None:
    """A line chart of the loss in ``box`` (left, top, right, bottom) with labelled axes."""
    left, top, right, bottom = box
    font = _font(14)
    draw.text((left, top - 24), "training loss (metrics.jsonl)", fill="black", font=_font(16))
    x0, x1, y0, y1 = left + 48, right, top, bottom - 40
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = y1 - frac * (y1 - y0)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((left, y - 7), f"{lo + frac * (hi - lo):.2f}", fill="black", font=font)
    last = max(steps[-1], 1)
    for frac in (0.0, 0.5, 1.0):
        x = x0 + frac * (x1 - x0)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 12, y1 + 6), f"{int(frac * last)}", fill="black", font=font)
    points = [(x0 + s / last * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)) for s, v in zip(steps, losses)]
    draw.line(points, fill=(40, 85, 215), width=2)
    draw.text(((x0 + x1) // 2 - 16, y1 + 22), "step", fill="black", font=font)


def draw_retrieval(canvas, draw, origin: tuple[int, int], captions, images, top, *, thumb: int = 72) -> None:
    """For each caption, its ``top`` retrieved images in rank order; the caption's own image
    framed in green, others in grey."""
    x, y = origin
    draw.text((x, y - 24), f"text -> image retrieval on the test split (top {top.shape[1]})",
              fill="black", font=_font(16))
    for row, (caption, ranked) in enumerate(zip(captions, top)):
        ty = y + row * (thumb + 34)
        draw.text((x, ty), caption[:90], fill="black", font=_font(13))
        for col, (index, correct) in enumerate(ranked):
            tx = x + col * (thumb + 10)
            image = Image.fromarray(images[index]).resize((thumb, thumb), Image.NEAREST)
            canvas.paste(image, (tx + 3, ty + 19))
            draw.rectangle((tx, ty + 16, tx + thumb + 5, ty + thumb + 21), outline=CORRECT if correct else OTHER,
                           width=3)


def draw_legend(draw, origin: tuple[int, int]) -> None:
    """What the frames of the retrieval examples mean."""
    x, y = origin
    font = _font(13)
    for i, (colour, words) in enumerate(((CORRECT, "the caption's own image"), (OTHER, "another test image"))):
        left = x + i * 210
        draw.rectangle((left, y, left + 14, y + 14), fill=colour)
        draw.text((left + 20, y), words, fill="black", font=font)


def draw_summary(draw, origin: tuple[int, int], before: dict, after: dict, num_test: int, num_classes: int) -> None:
    """The results table (chance, before and after training, percent) in columns."""
    x, y = origin
    font = _font(13)
    draw.text((x, y), f"test split, {num_test} image-caption pairs, {num_classes} classes (percent)",
              fill="black", font=_font(15))
    columns = (x + 150, x + 230, x + 310)
    for column, title in zip(columns, ("chance", "before", "after")):
        draw.text((column, y + 24), title, fill="black", font=font)
    for row, (label, task, metric, chance) in enumerate(ROWS):
        ty = y + 44 + row * 18
        key = f"{task}/scenes/en"
        draw.text((x, ty), label, fill="black", font=font)
        for column, value in zip(columns, (chance(num_test, num_classes), before[key][metric], after[key][metric])):
            draw.text((column, ty), f"{value:.1f}", fill="black", font=font)


def save_figure(path: str, metrics: list[dict[str, Any]], captions, images, top, *, before: dict, after: dict,
                num_test: int, num_classes: int) -> None:
    """``demo.png``: the loss curve, the retrieval examples with a legend, and the results table."""
    canvas = Image.new("RGB", (900, 680), "white")
    draw = ImageDraw.Draw(canvas)
    draw_loss(draw, (20, 50, 470, 480), [m["step"] for m in metrics], [m["loss"] for m in metrics])
    draw_retrieval(canvas, draw, (520, 50), captions, images, top)
    draw_legend(draw, (520, 50 + len(captions) * 106 + 4))
    draw_summary(draw, (20, 520), before, after, num_test, num_classes)
    canvas.save(path)


def retrieval_examples(model_dir: str, images, captions, *, text_length: int, count: int, k: int):
    """The trained model's top-``k`` test images for the first ``count`` test captions:
    ``(captions, array (count, k, 2) of [image index, whether it is the caption's image])``."""
    model = AlignModel.from_pretrained(model_dir)
    embedder = Embedder(model, AlignProcessor.from_pretrained(model_dir), batch_size=250, text_length=text_length)
    image_embeds = embedder.embed_images(images)
    text_embeds = embedder.embed_texts(captions[:count])
    order = np.argsort(-(text_embeds @ image_embeds.T), axis=1)[:, :k]
    return captions[:count], np.stack([order, order == np.arange(count)[:, None]], axis=-1)


# ----- main -----

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m altjax.demos.align", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=console.help_section("config", "--config.KEY=VALUE overrides an entry of configs/demo.py "
                                              "(altjax-train --config demo --print-config lists them)")
        + "\n\n" + console.exit_status_help(train.EXIT_CODES))
    parser.add_argument("--workdir", default="altjax-demo", help="where the run is written (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's total_steps)")
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}")
        overrides.append(item[len("--config."):])
    if args.steps is not None:
        overrides.append(f"total_steps={args.steps}")
    console.quiet_third_party(args.verbose)
    try:
        return run(args.workdir, overrides)
    except train.USER_ERRORS + train.RUN_FAILURES as e:
        return train.report("altjax-demo", e)


def run(workdir: str, overrides: list[str]) -> int:
    """The demo in ``workdir`` with ``--config`` overrides (see :func:`main`)."""
    start = time.perf_counter()
    config = train.load_config("demo", overrides)
    workdir = os.path.abspath(workdir)
    print(f"altjax demo: a tiny ALIGN trained from scratch on the embedded scenes dataset, in {workdir}")
    data_dir = config.data.data_dir or scenes.default_data_dir()
    print(f"[1/4] preparing the scenes dataset in {data_dir} (generated locally, once) ...", flush=True)
    scenes_config = scenes.scenes_config(**config.data.scenes)
    with console.third_party_stdout():  # tfds announces the dataset it generates there
        scenes.prepare(scenes_config, data_dir=config.data.data_dir or None)
    test = scenes.load_split("test", data_dir=config.data.data_dir or None, config=scenes_config, lang="en")
    print(f"      {config.data.scenes.num_train} training and {len(test['captions'])} test image-caption pairs, "
          f"e.g. \"{test['captions'][0]}\"")

    print(f"[2/4] training {config.total_steps} steps of {config.batch_size} pairs, evaluating on the test split "
          "before and after (progress on stderr) ...", flush=True)
    with console.third_party_stdout():
        result = train.train(config, workdir)
    before_file = os.path.join(workdir, "eval_before.json")
    if result["eval_start"]:
        with open(before_file, "w", encoding="utf-8") as f:
            json.dump(result["eval_start"], f, indent=2, sort_keys=True)
    with open(before_file, encoding="utf-8") as f:
        before = json.load(f)
    with open(os.path.join(workdir, "eval_results.json"), encoding="utf-8") as f:
        after = json.load(f)

    print("[3/4] results on the scenes test split (English):")
    print(results_table(before, after, len(test["captions"]), len(test["class_names"])))

    print("[4/4] drawing the loss curve and retrieval examples ...", flush=True)
    captions, top = retrieval_examples(result["model"], test["images"], test["captions"],
                                       text_length=int(config.data.max_length), count=RETRIEVAL_EXAMPLES, k=TOP_K)
    figure = os.path.join(workdir, "demo.png")
    save_figure(figure, train.read_metrics(workdir), captions, test["images"], top, before=before, after=after,
                num_test=len(test["captions"]), num_classes=len(test["class_names"]))
    print(f"done in {time.perf_counter() - start:.0f}s: {figure}, eval_results.json and metrics.jsonl in {workdir}")
    print(train.model_line("altjax-demo", result["model"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
