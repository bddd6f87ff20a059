"""A run's logs: ``metrics.jsonl`` and ``evals.jsonl`` (one JSON object per step)."""
from __future__ import annotations

import json
from typing import Any, Optional

from etils import epath

from altjax import fsutil
from altjax import workdir as workdirs


class MetricsLog:
    """A JSON-lines log of records with a ``step`` (``metrics.jsonl``, ``evals.jsonl``): appended
    one line per record; on resume, cut back to a step.

    An object store cannot append: on a remote ``path`` the log keeps its text and rewrites the
    whole file for each record (one object write, which readers see whole or not at all)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled
        self._text: Optional[str] = None  # remote: the file's text, read once

    def truncate(self, step: int) -> None:
        """Keeps the records of steps up to ``step``, one per step (the last written: a run
        resumed by an older altjax, or killed between a log line and its checkpoint, may have logged
        a step twice), and drops a half-written last line."""
        if not self.enabled or not epath.Path(self.path).exists():
            return
        kept: dict[Any, str] = {}
        for line in epath.Path(self.path).read_bytes().decode("utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept[record["step"]] = json.dumps(record)
        text = "".join(kept[s] + "\n" for s in sorted(kept))
        workdirs.write_text_atomic(self.path, text)
        self._text = text

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if not fsutil.is_remote(self.path):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            return
        if self._text is None:
            file = epath.Path(self.path)
            self._text = file.read_bytes().decode("utf-8") if file.exists() else ""
        self._text += line
        epath.Path(self.path).write_bytes(self._text.encode())


def read_metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (or of ``name``, e.g. ``"evals.jsonl"``)."""
    text = (epath.Path(workdir) / name).read_bytes().decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_evals(workdir: str) -> list[dict[str, Any]]:
    """Every evaluation of a run, in step order: ``[{"step": 0, "retrieval/scenes/en": {...}}, ...]``."""
    return read_metrics(workdir, "evals.jsonl")

