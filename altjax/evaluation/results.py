"""Results files: the JSON object of evaluations by name that ``altjax-eval --output`` and a
training run's ``eval_results.json`` merge into, never overwriting a file that is something else;
and one evaluation in clip_benchmark's layout (``altjax-eval --output-format clip_benchmark``).
The path may be remote (``gs://...``)."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from etils import epath

from altjax import fsutil
from altjax.evaluation.metrics import RECALL_KS

# clip_benchmark's names of the tasks, and of the fields of its result files.
CLIP_BENCHMARK_TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
CLIP_BENCHMARK_FIELDS = ("dataset", "model", "pretrained", "task", "metrics", "language")


def _read_json(path: str) -> Optional[Any]:
    """The JSON value in ``path`` (None if there is no file); ValueError if it is not JSON."""
    if not epath.Path(path).exists():
        return None
    try:
        return json.loads(epath.Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: exists and is not valid JSON ({e}); not overwriting it") from None


def read_results(path: str) -> dict[str, Any]:
    """The evaluations already in a results file (``{}`` if there is none); ValueError if the
    file is something else, which is then never overwritten."""
    results = _read_json(path)
    if results is None:
        return {}
    if not isinstance(results, dict) or set(CLIP_BENCHMARK_FIELDS) <= set(results):
        raise ValueError(f"{path}: exists and is not a JSON object of evaluations; not overwriting it")
    return results


def _write_json(path: str, value: Any) -> None:
    """Writes ``value`` as indented JSON to ``path``, replacing it atomically."""
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    if fsutil.is_remote(path):
        fsutil.write_remote(path, text.encode())
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = fsutil.make_temp_file(directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(path: str, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Merges ``results`` into the JSON object in ``path`` (created if absent); atomic replace."""
    merged = {**read_results(path), **results}
    _write_json(path, merged)
    return merged


def clip_benchmark_result(task: str, metrics: dict[str, Any], *, dataset: str, model: str, pretrained: str,
                          language: str) -> dict[str, Any]:
    """One evaluation (altjax's ``task`` and ``metrics``, in percent) as clip_benchmark writes it:
    ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, with its task names and
    its metrics, fractions: zero-shot ``acc1``, ``acc5`` (None with fewer than 5 classes, where
    clip_benchmark has NaN) and ``mean_per_class_recall``; retrieval
    ``image_retrieval_recall@K`` (text->image) and ``text_retrieval_recall@K`` (image->text) for
    K in 1, 5, 10."""
    if task == "zeroshot":
        scores = {"acc1": metrics["top1"] / 100,
                  "acc5": metrics["top5"] / 100 if metrics["classes"] >= 5 else None,
                  "mean_per_class_recall": metrics["mean_per_class_recall"] / 100}
    else:
        scores = {}
        for k in RECALL_KS:
            scores[f"image_retrieval_recall@{k}"] = metrics[f"t2i_r{k}"] / 100
            scores[f"text_retrieval_recall@{k}"] = metrics[f"i2t_r{k}"] / 100
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": CLIP_BENCHMARK_TASKS[task],
            "metrics": scores, "language": language}


def check_clip_benchmark_file(path: str) -> None:
    """ValueError unless ``path`` is absent or a clip_benchmark result, which may be replaced."""
    existing = _read_json(path)
    if existing is not None and not (isinstance(existing, dict) and set(CLIP_BENCHMARK_FIELDS) <= set(existing)):
        raise ValueError(f"{path}: exists and is not a clip_benchmark result; not overwriting it")


def write_clip_benchmark(path: str, result: dict[str, Any]) -> None:
    """Writes one :func:`clip_benchmark_result` to ``path`` (clip_benchmark writes a file per
    evaluation), replacing an earlier one but nothing else."""
    check_clip_benchmark_file(path)
    _write_json(path, result)
