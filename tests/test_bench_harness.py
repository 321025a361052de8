"""The benchmark harness's bookkeeping (benchmarks/common.py) on given numbers: call order,
the warm-up round, per-repetition ratios, median and spread. Nothing here is timed."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.common import Comparison, Ratio, compare, target_ratio


def scripted(calls: list[str], name: str, values: list[float | None]):
    """An arm that logs its calls and returns the next of ``values``."""
    it = iter(values)

    def arm() -> float | None:
        calls.append(name)
        return next(it)

    return arm


def test_arms_alternate_after_one_uncounted_warm_up_round():
    calls: list[str] = []
    c = compare(
        {"a": scripted(calls, "a", [9.0, 1.0, 2.0, 3.0]), "b": scripted(calls, "b", [90.0, 4.0, 8.0, 9.0])}, reps=3
    )
    assert calls == ["a", "b"] * 4
    assert c.warmup == {"a": 9.0, "b": 90.0}
    assert c.seconds == {"a": [1.0, 2.0, 3.0], "b": [4.0, 8.0, 9.0]}
    assert c.reps == 3 and c.median("b") == 8.0
    assert all(len(v) == 3 for v in c.loads.values())


def test_warm_up_mapping_replaces_only_the_arms_it_names_and_false_skips_the_round():
    calls: list[str] = []
    compare(
        {"a": scripted(calls, "a", [1.0, 1.0]), "b": scripted(calls, "b", [2.0])},
        reps=1,
        warmup={"b": scripted(calls, "b-short", [0.5])},
    )
    assert calls == ["a", "b-short", "a", "b"]
    calls.clear()
    c = compare({"a": scripted(calls, "a", [1.0]), "b": scripted(calls, "b", [2.0])}, reps=1, warmup=False)
    assert calls == ["a", "b"] and c.warmup == {}


def test_an_arm_returning_none_is_timed_around_its_call_with_the_clock():
    ticks = itertools.count(start=0.0, step=0.25)  # every clock read advances 0.25 s
    c = compare({"a": lambda: None, "b": lambda: 7.0}, reps=2, warmup=False, clock=lambda: next(ticks))
    assert c.seconds == {"a": [0.25, 0.25], "b": [7.0, 7.0]}


def test_ratio_is_the_median_of_per_repetition_ratios_not_the_ratio_of_medians():
    c = Comparison(
        seconds={"fast": [1.0, 2.0, 4.0], "slow": [3.0, 2.0, 20.0]},
        loads={"fast": [1.0, 2.0, 3.0], "slow": [4.0, 0.5, 1.5]},
    )
    r = c.ratio("fast", "slow")  # per round: 3/1, 2/2, 20/4
    assert r.values == (3.0, 1.0, 5.0)
    assert (r.median, r.lo, r.hi) == (3.0, 1.0, 5.0)
    assert c.median("slow") / c.median("fast") == 1.5  # what a ratio of medians would have said
    assert c.ratio("slow", "fast").values == pytest.approx((1 / 3, 1.0, 0.2))
    assert sorted(r.loads) == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


def test_ratio_of_arms_with_different_repetition_counts_is_refused():
    with pytest.raises(ValueError):
        Comparison(seconds={"a": [1.0, 2.0], "b": [1.0]}, loads={"a": [0, 0], "b": [0]}).ratio("a", "b")


def test_target_ratio_judges_the_median_and_prints_the_spread_and_load(capsys):
    assert target_ratio("x_vs_y", Ratio((0.9, 1.2, 1.1), loads=(0.5, 3.0)), ">=", 1.0)
    assert not target_ratio("x_vs_y", Ratio((0.9, 1.2, 0.95)), ">=", 1.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "x_vs_y: median 1.10 of 3 repetitions (0.90, 1.20, 1.10), spread 0.90-1.20, load 0.5-3.0",
        "TARGET x_vs_y measured=1.10 goal=>=1.0 PASS",
    ]
    assert lines[3] == "TARGET x_vs_y measured=0.95 goal=>=1.0 MISS"


def test_report_prints_one_row_per_arm_with_median_spread_and_rate(capsys):
    c = Comparison(
        seconds={"a": [0.5, 0.25, 1.0], "b": [2.0, 2.0, 2.0]},
        loads={"a": [1.0, 2.0, 1.5], "b": [1.0, 1.0, 1.0]},
        warmup={"a": 3.0, "b": 2.5},
        unit="s/image",
    )
    c.report("extraction", rate="images/s")
    rows = {
        line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("a ", "b "))
    }
    assert rows["a"] == ["a", "0.5", "0.25-1", "3", "2", "1.0-2.0"]
    assert rows["b"] == ["b", "2", "2-2", "2.5", "0.5", "1.0-1.0"]
