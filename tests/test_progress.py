"""The progress reporter's ETA counts from the first finished unit, not from the start-up."""

from __future__ import annotations

import logging

from pipeline.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_leaves_the_start_up_out(caplog):
    clock = Clock()
    p = Progress(10, what="extract", unit="shards", every=0.0, bar=False, clock=clock)
    clock.t = 10.0  # 10 s of start-up before the first shard
    with caplog.at_level(logging.INFO, logger="lcam.progress"):
        p.update(1)
        # one unit: no steady rate yet, the overall one (1 in 10 s) -> 9 left at 0.1/s
        assert caplog.records[-1].getMessage() == "extract: 1/10 shards, 0.10 shards/s, ETA 90s"
        for _ in range(2):  # then one shard a second
            clock.t += 1.0
            p.update(1)
    # 2 shards in the 2 s since the first: 1/s, 7 left -> 7 s (the overall rate, 3 in 12 s, said 28 s)
    assert caplog.records[-1].getMessage() == "extract: 3/10 shards, 1.00 shards/s, ETA 7s"
    assert abs(p.rate - 3 / 12) < 1e-12
    clock.t += 7.0
    with caplog.at_level(logging.INFO, logger="lcam.progress"):
        p.update(7)
        p.close()
    assert caplog.records[-2].getMessage() == "extract: 10/10 shards, 1.00 shards/s"
    assert caplog.records[-1].getMessage() == "extract: 10 shards done, 0.53 shards/s"


def test_resumed_progress_counts_from_its_initial():
    clock = Clock()
    p = Progress(10, enabled=False, initial=4, bar=False, clock=clock)
    clock.t = 2.0
    p.update(1)
    assert p.steady_rate == p.rate == 0.5
    clock.t = 3.0
    p.update(2)
    assert p.steady_rate == 2.0
