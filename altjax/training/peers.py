"""Every process of a multi-process run watches the others, so that a dead peer ends the run in seconds.

Left to JAX's defaults, a process whose peer died hangs in its next collective until JAX's own
heartbeat gives up (100 s), then aborts with SIGABRT and a stack dump; at exit it waits again in
the shutdown barrier. Two things change that:

* :func:`initialize` turns on JAX's recoverability, under which a collective whose peer is gone
  raises at once instead of hanging.
* :class:`PeerWatch` posts this process's heartbeat to the coordination service's key-value store
  every ``timeout / 5`` seconds from a background thread and reads everyone else's. A peer whose
  heartbeat has not moved for ``timeout`` seconds (a lost host: no connection is closed, nothing
  raises), or a coordination service that has not answered for as long, ends this process: one
  line naming the failure on stderr, then ``os._exit`` with :data:`PEER_LOST_EXIT`, waiting in no
  collective or barrier. An error raised inside the watch (the failed collective) is first held
  for up to ``timeout`` seconds to see whether a peer was lost: if so, the lost peer is reported
  instead of the error's traceback.

Checkpoints are written complete or not at all, so the last complete one survives and a restart
resumes from it. One case stays JAX's: when process 0, which hosts the coordination service,
dies, JAX's client ends every other process at once (SIGABRT) with its own message (a callback
that would replace it, ``missed_heartbeat_callback``, cannot be used from Python in jax 0.10: it
aborts with ``std::bad_cast``).

A process that leaves the watch marks its heartbeat: ``done`` (finished, or stopped by a signal
all processes agreed on), so that its peers do not mistake a normal end for a death, or
``failed: <error>``, which ends its peers within :data:`FAILURE_GRACE_S` with that error named.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from typing import Callable, Optional

import jax
# The coordination service's key-value store has no public accessor; jax.distributed keeps the client here.
from jax._src import distributed

PEER_LOST_EXIT = 1
DONE, FAILED, LEFT = "done", "failed: ", "left"
# Exit statuses every process reaches together (SIGINT / SIGTERM, agreed before saving).
AGREED_EXITS = (130, 143)
# A peer that failed is given this long to end on its own first: when all processes fail alike,
# each reports its own error and status.
FAILURE_GRACE_S = 2.0
_runs = itertools.count()  # every process numbers its runs alike: they all call train() in turn


def initialize(*, heartbeat_timeout_s: int = 100, **kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)`` with recoverability on, so that a collective whose
    peer died raises instead of hanging. ``heartbeat_timeout_s``: when JAX's own heartbeat declares
    a process dead (it must exceed the watch's ``timeout``, which ends the run with one line)."""
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s, **kwargs)


def shutdown(timeout_s: float = 30.0) -> None:
    """``jax.distributed.shutdown()``, process 0 last. Under recoverability JAX's shutdown has no
    barrier, and process 0 hosts the coordination service: leaving first, it would abort the
    others in their own shutdown. So process 0 waits (up to ``timeout_s``) until the service sees
    no other process alive."""
    client = distributed.global_state.client
    if client is None:
        return
    if jax.process_index() == 0 and jax.process_count() > 1:
        everyone = list(range(jax.process_count()))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not set(client.get_live_nodes(everyone)) - {0}:
                    break
            except Exception:  # noqa: BLE001 - nothing more to wait for
                break
            time.sleep(0.05)
    jax.distributed.shutdown()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:200]


class PeerWatch:
    """Watches this run's peers (see the module docstring); a no-op on one process.

    ``timeout_s``: how long a peer may stay silent (0: no watch). ``describe``: called when a peer
    is lost, says what the run leaves behind (e.g. the last checkpoint), appended to the line.
    ``agreed``: exception types that every process raises together (a config mistake, a diverged
    loss): they leave at once, marked failed, without waiting to see whether a peer was lost.
    ``prog``: the line's prefix. A peer that has not posted its first heartbeat yet gets
    ``max(timeout_s, 30)`` seconds more: processes reach the watch at different times.
    """

    def __init__(self, timeout_s: float, describe: Callable[[], str] = lambda: "", *,
                 agreed: tuple[type[BaseException], ...] = (), prog: str = "altjax-train"):
        self.timeout_s = float(timeout_s)
        self.describe, self.agreed, self.prog = describe, agreed, prog
        self.count, self.me = jax.process_count(), jax.process_index()
        self.client = distributed.global_state.client
        self.active = self.count > 1 and self.client is not None and self.timeout_s > 0
        self.prefix = f"altjax/heartbeat/{next(_runs)}/"
        self._stop = threading.Event()
        self._beat = 0
        self._started = self._last_answer = time.monotonic()
        self._seen: dict[int, tuple[str, float]] = {}
        self._done: set[int] = set()
        self._failed: dict[int, tuple[str, float]] = {}
        self._threads: list[threading.Thread] = []
        self._error: Optional[BaseException] = None

    @property
    def interval(self) -> float:
        return min(max(self.timeout_s / 5, 0.1), 2.0)

    def __enter__(self) -> "PeerWatch":
        if self.active:
            self._started = self._last_answer = time.monotonic()
            self._threads = [threading.Thread(target=self._post, name="altjax-heartbeat", daemon=True),
                             threading.Thread(target=self._judge, name="altjax-peer-watch", daemon=True)]
            for thread in self._threads:
                thread.start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None or (kind is SystemExit and error.code in AGREED_EXITS):
            self.stop()
            return
        if self.active and not isinstance(error, self.agreed) and not self._stop.is_set():
            # A collective whose peer died raises here before the peer's silence is long enough
            # to be judged: wait for the verdict (the judge thread exits the process if a peer is lost).
            self._error = error
            deadline = time.monotonic() + self.timeout_s + max(self.timeout_s, 30.0) + 2 * self.interval
            while time.monotonic() < deadline and self.lost() is None:
                time.sleep(self.interval / 2)
            self._end_if_lost()
        self.stop(failure=_first_line(error))

    def stop(self, failure: Optional[str] = None) -> None:
        """Stops watching and tells the peers that this process leaves: done, or with ``failure``.
        On a failure process 0, which hosts the coordination service, then waits (a few seconds at
        most) until every peer has marked its own end: leaving first, it would abort them."""
        if not self.active or self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        try:
            self.client.key_value_set(f"{self.prefix}{self.me}", DONE if failure is None else FAILED + failure,
                                      allow_overwrite=True)
            if failure is not None and self.me == 0:
                deadline = time.monotonic() + self.timeout_s + FAILURE_GRACE_S + 5.0
                while time.monotonic() < deadline:
                    ended = [v for _, v in self.client.key_value_dir_get(self.prefix)
                             if v in (DONE, LEFT) or v.startswith(FAILED)]
                    if len(ended) >= self.count:
                        time.sleep(0.5)  # their last moments: the exit after the mark
                        break
                    time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the service may be gone already; the peers then judge it themselves
            pass

    def _post(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat += 1
                self.client.key_value_set(f"{self.prefix}{self.me}", str(self._beat), allow_overwrite=True)
                entries = self.client.key_value_dir_get(self.prefix)
            except Exception:  # noqa: BLE001 - an unreachable service is judged by its silence
                self._stop.wait(self.interval)
                continue
            now = time.monotonic()
            self._last_answer = now
            for key, value in entries:
                peer = int(key.rsplit("/", 1)[-1])
                if value in (DONE, LEFT):
                    self._done.add(peer)
                elif value.startswith(FAILED):
                    self._failed.setdefault(peer, (value[len(FAILED):], now))
                elif peer not in self._seen or self._seen[peer][0] != value:
                    self._seen[peer] = (value, now)
            self._stop.wait(self.interval)

    def lost(self, now: Optional[float] = None) -> Optional[str]:
        """What is lost, if anything: a peer that failed or fell silent, or the coordination service."""
        now = time.monotonic() if now is None else now
        for peer, (why, since) in sorted(self._failed.items()):
            if now - since > min(FAILURE_GRACE_S, self.timeout_s):
                return f"process {peer} of {self.count} failed ({why})"
        if now - self._last_answer > self.timeout_s:
            return (f"the coordination service (process 0) has not answered for {now - self._last_answer:.0f} s: "
                    "process 0 is gone or unreachable")
        for peer in range(self.count):
            if peer == self.me or peer in self._done or peer in self._failed:
                continue
            if peer in self._seen:
                silent = now - self._seen[peer][1]
                if silent > self.timeout_s:
                    return f"process {peer} of {self.count} has sent no heartbeat for {silent:.0f} s: it died or hangs"
            elif now - self._started > self.timeout_s + max(self.timeout_s, 30.0):
                return f"process {peer} of {self.count} never joined this run's heartbeats"
        return None

    def _end_if_lost(self) -> None:
        what = self.lost()
        if what is None:
            return
        try:
            left = self.describe()
        except Exception:  # noqa: BLE001 - the line must go out whatever the description does
            left = ""
        then = f" (here: {_first_line(self._error)})" if self._error is not None else ""
        print(f"{self.prog}: error: {what}{then}; process {self.me} stops now (peer_timeout_s "
              f"{self.timeout_s:g}){'; ' + left if left else ''}", file=sys.stderr, flush=True)
        try:
            self.client.key_value_set(f"{self.prefix}{self.me}", LEFT, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
        os._exit(PEER_LOST_EXIT)

    def _judge(self) -> None:
        while not self._stop.wait(self.interval):
            self._end_if_lost()
