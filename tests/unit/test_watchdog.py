"""The hang watchdog's judgement (distsft.trainer.watchdog), from heartbeats and its own clock: a rank whose beat
stops is lost, one whose progress stops while another rank is further on is stuck, and ranks that are all at the
same point (a long checkpoint write, the others at its barrier) are not judged."""

from __future__ import annotations

from pathlib import Path

from distsft.trainer.watchdog import Watchdog


def beat(n: int, step: int, phase: str, changes: int) -> dict:
    return {"beat": n, "host": "h", "pid": 100, "step": step, "phase": phase, "changes": changes}


def dog() -> Watchdog:
    return Watchdog(rank=0, world=2, timeout=10, run_dir=Path("unused"))


def test_a_rank_whose_beat_stops_is_lost():
    d = dog()
    assert d.judge({0: beat(1, 3, "optimizer", 5), 1: beat(1, 3, "forward/backward", 4)}, now=0) is None
    assert d.judge({0: beat(5, 3, "optimizer", 5), 1: beat(1, 3, "forward/backward", 4)}, now=9) is None
    lost, stuck, seen = d.judge({0: beat(9, 3, "optimizer", 5), 1: beat(1, 3, "forward/backward", 4)}, now=11)
    assert (lost, stuck) == ([1], []) and seen[1]["phase"] == "forward/backward"


def test_a_rank_that_beats_but_stays_behind_the_others_is_stuck():
    d = dog()
    d.judge({0: beat(1, 5, "data", 10), 1: beat(1, 4, "checkpoint", 8)}, now=0)
    # rank 0 waits in step 5's first collective (its progress stops too, but it is ahead); rank 1 beats on
    assert d.judge({0: beat(2, 5, "forward/backward", 11), 1: beat(2, 4, "checkpoint", 8)}, now=1) is None
    lost, stuck, _ = d.judge({0: beat(12, 5, "forward/backward", 11), 1: beat(12, 4, "checkpoint", 8)}, now=12)
    assert (lost, stuck) == ([], [1])


def test_ranks_at_the_same_point_are_not_judged_however_long():
    """A long checkpoint write: the writer and the ranks at its barrier all sit at step 4, checkpoint."""
    d = dog()
    for t in range(0, 100, 5):
        assert d.judge({0: beat(t, 4, "checkpoint", 8), 1: beat(t, 4, "checkpoint", 8)}, now=t) is None


def test_progress_that_moves_is_not_stuck_even_when_behind():
    d = dog()
    for t in range(0, 60, 5):  # rank 1 is slower, a phase behind, but its phases change
        assert d.judge({0: beat(t, t, "optimizer", 2 * t), 1: beat(t, t, "forward/backward", 2 * t + 1)}, now=t) \
            is None


def test_after_a_stop_request_a_lost_rank_is_judged_sooner():
    """A stop was requested (SIGTERM: the launcher will kill the ranks after its grace): a rank whose beat stopped is
    lost after max(3 beats, timeout / 10), here 60 s of a 600 s timeout; a rank that only waits is not judged."""
    from distsft.trainer import watchdog

    d = Watchdog(rank=0, world=2, timeout=600, run_dir=Path("unused"))
    watchdog._state["stopping"] = False
    try:
        assert d.judge({0: beat(1, 3, "checkpoint", 5), 1: beat(1, 3, "checkpoint", 4)}, now=0) is None
        assert d.judge({0: beat(20, 3, "checkpoint", 5), 1: beat(1, 3, "checkpoint", 4)}, now=100) is None
        watchdog.stopping()
        lost, stuck, _ = d.judge({0: beat(21, 3, "checkpoint", 5), 1: beat(1, 3, "checkpoint", 4)}, now=101)
        assert (lost, stuck) == ([1], [])
        d2 = Watchdog(rank=0, world=2, timeout=600, run_dir=Path("unused"))
        assert d2.judge({0: beat(1, 3, "checkpoint", 5), 1: beat(1, 3, "checkpoint", 4)}, now=0) is None
        assert d2.judge({0: beat(2, 3, "checkpoint", 5), 1: beat(2, 3, "checkpoint", 4)}, now=500) is None
    finally:
        watchdog._state["stopping"] = False
