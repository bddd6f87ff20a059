"""Stopping a run by signal: the first SIGINT (Ctrl-C) or SIGTERM (preemption) asks the trainer
to save and exit; a second one exits at once.

Python runs signal handlers only between bytecodes of the main thread, so a handler alone would
wait for a compilation or a long device call to return before it saw Ctrl-C. Here the C-level
handler's wakeup byte (``signal.set_wakeup_fd``) is read by a watcher thread, which acknowledges
the first signal immediately and carries out the second one while the main thread is still busy.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

EXIT_STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}
# The same signal again within this many seconds is the same request delivered twice (``timeout``
# signals the child and then its whole process group); a person pressing Ctrl-C twice is slower.
REPEAT_WINDOW_S = 0.1
_STOP_WATCHING = 0  # a byte no signal has: tells the watcher thread to end


class StopSignals:
    """Within ``with StopSignals(...) as stop:``, :attr:`requested` is the first stop signal
    received (None before). ``acknowledge(signum)`` is called on the first, from the watcher
    thread; on the second, ``abandon(signum)`` runs there and the process exits with
    :data:`EXIT_STATUS` of the first at once. Outside the main thread it does nothing (signals
    reach only the main thread's handlers)."""

    def __init__(self, acknowledge: Callable[[int], None], abandon: Callable[[int], None]):
        self.acknowledge, self.abandon = acknowledge, abandon
        self.received: list[int] = []
        self._last = 0.0
        self._previous: dict[int, object] = {}
        self._previous_fd: Optional[int] = None
        self._fds: Optional[tuple[int, int]] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def requested(self) -> Optional[int]:
        return self.received[0] if self.received else None

    def request(self, signum: int) -> None:
        """Records a stop as if ``signum`` had arrived (another process of the run received it)."""
        if not self.received:
            self.received.append(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._fds = (read, write)
        for signum in EXIT_STATUS:
            # A Python-level handler must be installed for the wakeup byte to be written; the work
            # is the watcher's, so the handler itself does nothing (and raises no KeyboardInterrupt).
            self._previous[signum] = signal.signal(signum, _ignore)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="altjax-stop-signals", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        read = self._fds[0]
        while True:
            data = os.read(read, 64)
            for signum in data:
                if signum == _STOP_WATCHING:
                    return
                if signum not in EXIT_STATUS:
                    continue
                now = time.monotonic()
                if self.received and signum == self.received[-1] and now - self._last < REPEAT_WINDOW_S:
                    continue
                self._last = now
                self.received.append(signum)
                if len(self.received) == 1:
                    self.acknowledge(signum)
                else:
                    try:
                        self.abandon(signum)
                    finally:
                        os._exit(EXIT_STATUS[self.received[0]])

    def __exit__(self, *exc) -> None:
        if self._fds is None:
            return
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        read, write = self._fds
        os.write(write, bytes([_STOP_WATCHING]))
        self._thread.join(timeout=5)
        os.close(read)
        os.close(write)
        self._fds = None


def _ignore(signum, frame) -> None:
    del signum, frame
