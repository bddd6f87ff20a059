"""altjax.training.peers: the verdicts of the peer watch, from heartbeats it has seen (the processes
themselves are killed and watched in test_train_topology.py)."""
from altjax.training import peers


def watch(count=3, timeout=10.0) -> peers.PeerWatch:
    w = peers.PeerWatch(timeout)
    assert not w.active, "one process: the watch must do nothing"
    w.count, w.me = count, 0
    w._started = w._last_answer = 100.0
    return w


def test_silent_failed_and_finished_peers():
    w = watch()
    w._seen = {1: ("7", 100.0), 2: ("3", 104.0)}
    assert w.lost(now=109.0) is None, "every peer heard from within the timeout"
    w._last_answer = 110.5  # the service answers; process 1 no longer posts
    verdict = w.lost(now=111.0)
    assert verdict and verdict.startswith("process 1 of 3 has sent no heartbeat for 11 s"), verdict
    w._done.add(1)
    w._last_answer = 111.0
    assert w.lost(now=112.0) is None, f"a peer that finished is not lost: {w.lost(now=112.0)}"
    w._failed[2] = ("ValueError: bad", 112.0)
    assert w.lost(now=113.0) is None, "a failed peer gets FAILURE_GRACE_S to report its own error"
    assert w.lost(now=112.0 + peers.FAILURE_GRACE_S + 0.1) == "process 2 of 3 failed (ValueError: bad)"


def test_an_unanswering_service_and_a_peer_that_never_joined():
    w = watch(count=2)
    w._seen = {1: ("1", 100.0)}
    verdict = w.lost(now=100.0 + 10.5)
    assert verdict and "coordination service (process 0) has not answered for 10 s" in verdict, verdict
    w = watch(count=2)
    w._last_answer = 140.0
    assert w.lost(now=100.0 + 39.0) is None, "a peer is given timeout + 30 s to post its first heartbeat"
    assert w.lost(now=100.0 + 40.5) == "process 1 of 2 never joined this run's heartbeats"
