"""A run's logs: ``metrics.jsonl`` and ``evals.jsonl`` (one JSON object per step), and its console lines."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from altjax import workdir as workdirs


class MetricsLog:
    """A JSON-lines log of records with a ``step`` (``metrics.jsonl``, ``evals.jsonl``): appended
    one line per record; on resume, cut back to a step."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate(self, step: int) -> None:
        """Keeps the records of steps up to ``step``, one per step (the last written: a run
        resumed by an older altjax, or killed between a log line and its checkpoint, may have logged
        a step twice), and drops a half-written last line."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept: dict[Any, str] = {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    kept[record["step"]] = json.dumps(record)
        workdirs.write_text_atomic(self.path, "".join(kept[s] + "\n" for s in sorted(kept)))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (or of ``name``, e.g. ``"evals.jsonl"``)."""
    with open(os.path.join(workdir, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_evals(workdir: str) -> list[dict[str, Any]]:
    """Every evaluation of a run, in step order: ``[{"step": 0, "retrieval/scenes/en": {...}}, ...]``."""
    return read_metrics(workdir, "evals.jsonl")


def console(line: str) -> None:
    # Clears a progress line being redrawn in place on a terminal before printing.
    sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + line + "\n")
    sys.stderr.flush()
