"""SIGINT and SIGTERM: the first asks for a stop (no KeyboardInterrupt), a second one exits at once,
even while the main thread is busy in a call that does not return to Python."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from altjax.stop_signals import EXIT_STATUS, StopSignals


def test_the_first_signal_is_recorded_and_acknowledged():
    seen = []
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(seen.append, lambda s: None) as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without StopSignals
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested == signal.SIGINT and seen == [signal.SIGINT], (stop.received, seen)
    assert signal.getsignal(signal.SIGINT) is before, "the previous SIGINT handler was not restored"


def test_a_signal_delivered_twice_at_once_is_one_request():
    seen, abandoned = [], []
    with StopSignals(seen.append, abandoned.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does: the child, then its process group
        time.sleep(0.3)
        assert stop.received == [signal.SIGTERM] and not abandoned, stop.received


BUSY = textwrap.dedent("""
    import sys, threading
    from altjax.stop_signals import StopSignals
    with StopSignals(lambda s: print("stopping", flush=True), lambda s: print("abandoned", flush=True)):
        print("ready", flush=True)
        threading.Event().wait(60)   # the main thread blocked, as in a compilation
    print("returned", flush=True)
""")


def test_a_second_signal_exits_at_once_while_the_main_thread_is_busy():
    process = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline().strip() == "stopping"
    time.sleep(0.3)
    start = time.monotonic()
    process.send_signal(signal.SIGINT)
    out = process.communicate(timeout=10)[0]
    assert process.returncode == EXIT_STATUS[signal.SIGINT] and out.strip() == "abandoned", (process.returncode, out)
    assert time.monotonic() - start < 5, "the second signal did not end the process at once"
