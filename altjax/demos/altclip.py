"""The miniature of the AltCLIP results table, on the embedded bilingual scenes dataset.

    python -m altjax.demos.altclip [--workdir altclip-demo] [--scale 1.0]

Three runs of ``altjax-train`` (the recipes ``configs/altclip_distill.py`` and
``configs/altclip_contrastive.py`` at tiny size, each in a subdirectory of the workdir):

1. ``teacher/``: a tiny CLIP (ViT + CLIP text) trained from scratch on the English captions only,
   with a word-level English tokenizer: Chinese is out of its vocabulary, as it is for CLIP.
2. ``phase1/``: teacher learning: a tiny AltCLIP (XLM-R-style text tower over a tokenizer of English
   words and Chinese characters) regresses the teacher's text embedding, from English-English and
   English-Chinese caption pairs; its image tower is the teacher's.
3. ``phase2/``: contrastive learning on images with English and Chinese captions, image tower frozen.

Then prints the table: rows CLIP, AltCLIP after phase 1, AltCLIP after phase 2; columns EN/ZH x
text->image/image->text x R@1/5/10 and MR (their mean), on the scenes test split, and writes it to
``table.json`` and ``table.md``. ``--scale`` multiplies every run's steps. Runs that finished are
not repeated. The last line names phase 2's model (the bilingual AltCLIP) and how to load it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from altjax import console, train

METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
ROWS = (("CLIP (teacher)", "teacher"), ("AltCLIP phase 1", "phase1"), ("AltCLIP phase 2", "phase2"))
LANGS = ("en", "zh")
# clip-tiny's vision tower, which AltCLIP's must equal to take it over.
VISION = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, projection_dim=64)
TEXT = dict(vocab_size=-1, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=48, project_dim=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
EVALS = ("retrieval/scenes/en", "retrieval/scenes/zh")
STEPS = {"teacher": 400, "phase1": 300, "phase2": 150}  # at --scale 1


def _common(c, steps: int, lr: float, warmup: int) -> None:
    c.total_steps = steps
    c.batch_size = 64
    c.log_every = 25
    c.checkpoint_every = steps
    c.model.dtype = "float32"
    c.model.projection_dim = 64
    c.model.vision = dict(VISION)
    c.data.scenes = dict(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000, seed=0)
    # The longest Chinese caption is 40 XLM-R tokens with <s> and </s>.
    c.data.max_length = 40
    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = warmup
    c.optimizer.decay = "cosine"
    c.eval.datasets = EVALS
    c.eval.batch_size = 250
    c.eval.at_end = True


def teacher_config(steps: int):
    """A tiny CLIP trained on the English captions (the phase-2 recipe, everything trainable)."""
    c = train.load_config("altclip_contrastive")
    _common(c, steps, 2e-3, 50)
    c.task = "clip"
    c.freeze = ""
    c.model.preset = "clip-tiny"
    c.model.text = dict(vocab_size=-1, max_position_embeddings=32)
    c.data.langs = ("en",)
    c.data.tokenizer = "scenes-clip"
    c.data.max_length = 32
    c.data.augment = "random_crop"
    c.optimizer.weight_decay = 0.1
    return c


def phase1_config(steps: int, teacher_dir: str):
    """Teacher learning at tiny size: scenes caption pairs, EN-EN and EN-ZH."""
    c = train.load_config("altclip_distill")
    _common(c, steps, 2e-3, 50)
    c.model.preset = "altclip-tiny"
    c.model.text = dict(TEXT)
    c.distill.teacher = teacher_dir
    c.distill.teacher_max_length = 32
    c.data.source = "scenes"
    c.data.tokenizer = "scenes-xlmr"
    return c


def phase2_config(steps: int, student_dir: str):
    """Contrastive learning at tiny size: EN and ZH captions, image tower frozen."""
    c = train.load_config("altclip_contrastive")
    _common(c, steps, 3e-4, 20)
    c.model.preset = "altclip-tiny"
    c.model.init_from = student_dir
    c.model.text = dict(TEXT)
    return c


def scaled_steps(scale: float) -> dict[str, int]:
    """Each run's steps at ``scale`` (at least 1)."""
    return {k: max(1, int(round(v * scale))) for k, v in STEPS.items()}


def run_phase(config, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (unless it finished before); its final evaluation."""
    results = os.path.join(workdir, "eval_results.json")
    if not os.path.isdir(os.path.join(workdir, train.EXPORT_DIR)):
        with console.third_party_stdout():  # tfds announces the dataset it generates there
            train.train(config, workdir)
    with open(results, encoding="utf-8") as f:
        return json.load(f)


def table_rows(evals: dict[str, dict]) -> list[dict]:
    """``[{"model", "en": {metric: value}, "zh": {...}}]`` in table order."""
    return [{"model": label, **{lang: evals[key][f"retrieval/scenes/{lang}"] for lang in LANGS}}
            for label, key in ROWS if key in evals]


def markdown(rows: list[dict], num_test: int) -> str:
    """The table in Markdown, percentages with one decimal, and the chance level."""
    names = [f"{lang.upper()} {m[:3].upper()} R@{m.split('_r')[1]}" for lang in LANGS for m in METRICS]
    head = "| model | " + " | ".join(names) + " | EN MR | ZH MR |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for row in rows:
        values = [row[lang][m] for lang in LANGS for m in METRICS] + [row[lang]["mr"] for lang in LANGS]
        lines.append(f"| {row['model']} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    chance = [100 * int(m.split("_r")[1]) / num_test for lang in LANGS for m in METRICS]
    chance += [sum(chance[:6]) / 6] * 2
    lines.append("| chance | " + " | ".join(f"{v:.1f}" for v in chance) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m altjax.demos.altclip", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=console.exit_status_help(train.EXIT_CODES))
    parser.add_argument("--workdir", default="altclip-demo", help="where the runs are written (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every run's steps (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = parser.parse_args(argv)
    console.quiet_third_party(args.verbose)
    try:
        return run(args.workdir, args.scale)
    except train.USER_ERRORS + train.RUN_FAILURES as e:
        return train.report("altclip-demo", e)


def run(workdir: str, scale: float) -> int:
    """The three runs in ``workdir``, each ``scale`` times as long (see :func:`main`)."""
    steps = scaled_steps(scale)
    workdir = os.path.abspath(workdir)
    start = time.perf_counter()
    evals = {}
    print(f"[1/3] teacher: a tiny CLIP on the English captions, {steps['teacher']} steps", flush=True)
    evals["teacher"] = run_phase(teacher_config(steps["teacher"]), os.path.join(workdir, "teacher"))
    print(f"[2/3] phase 1: teacher learning from EN-EN and EN-ZH caption pairs, {steps['phase1']} steps", flush=True)
    evals["phase1"] = run_phase(phase1_config(steps["phase1"], os.path.join(workdir, "teacher", "model")),
                                os.path.join(workdir, "phase1"))
    print(f"[3/3] phase 2: contrastive learning, EN and ZH captions, image tower frozen, {steps['phase2']} steps",
          flush=True)
    evals["phase2"] = run_phase(phase2_config(steps["phase2"], os.path.join(workdir, "phase1", "model")),
                                os.path.join(workdir, "phase2"))
    rows = table_rows(evals)
    text = markdown(rows, num_test=1000)
    with open(os.path.join(workdir, "table.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "steps": steps}, f, indent=2)
    with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\nRetrieval on the scenes test split (1,000 pairs), percent:\n{text}")
    print(f"\ndone in {time.perf_counter() - start:.0f}s: {workdir}/table.md, table.json")
    print(train.model_line("altclip-demo", os.path.join(workdir, "phase2", train.EXPORT_DIR)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
