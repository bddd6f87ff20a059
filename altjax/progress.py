"""A dependency-free progress line on stderr: count, rate and ETA, redrawn at most a few times a second."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``with Progress(total, "converting") as p: ... p.update(n)``; silent when ``enabled`` is false.

    On a terminal the line is redrawn in place; elsewhere (logs, CI) a line is printed every
    ``log_every`` seconds so long runs stay visible without flooding the log.
    """

    def __init__(self, total: Optional[float], desc: str, *, unit: str = "it", enabled: bool = True,
                 stream: Optional[TextIO] = None, log_every: float = 10.0, scale: float = 1.0):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream or sys.stderr
        self.scale = scale  # e.g. 2**20 to count bytes and show MiB
        self.count = 0.0
        self._start = time.perf_counter()
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._interval = 0.2 if self._tty else log_every

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count / self.scale:.1f}" if self.scale != 1 else f"{int(self.count)}"
        if self.total:
            total = f"{self.total / self.scale:.1f}" if self.scale != 1 else f"{int(self.total)}"
            eta = (self.total - self.count) / rate if rate > 0 else 0.0
            return (f"{self.desc}: {done}/{total} {self.unit} ({100 * self.count / self.total:3.0f}%) "
                    f"{rate / self.scale:.1f} {self.unit}/s, elapsed {_duration(elapsed)}, eta {_duration(eta)}")
        return f"{self.desc}: {done} {self.unit}, {rate / self.scale:.1f} {self.unit}/s, elapsed {_duration(elapsed)}"

    def update(self, n: float = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self._interval:
            self._last = now
            self._write(self._line())

    def _write(self, line: str) -> None:
        self.stream.write(("\r" + line + "\033[K") if self._tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._write(self._line())
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()
            self.enabled = False
