"""Results files: the JSON object of evaluations by name that ``altjax-eval --output`` and a
training run's ``eval_results.json`` merge into, never overwriting a file that is something else.
The path may be remote (``gs://...``)."""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from altjax import fsutil


def read_results(path: str) -> dict[str, Any]:
    """The evaluations already in a results file (``{}`` if there is none); ValueError if the
    file is something else, which is then never overwritten."""
    if not epath.Path(path).exists():
        return {}
    try:
        results = json.loads(epath.Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: exists and is not valid JSON ({e}); not overwriting it") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: exists and is not a JSON object of evaluations; not overwriting it")
    return results


def write_results(path: str, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Merges ``results`` into the JSON object in ``path`` (created if absent); atomic replace."""
    merged = {**read_results(path), **results}
    if fsutil.is_remote(path):
        fsutil.write_remote(path, (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode())
        return merged
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = fsutil.make_temp_file(directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return merged
