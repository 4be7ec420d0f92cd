"""edgert.timing: alternating blocks, block sizes, untimed starts, settling and the budget, on a clock that moves
only when a fake engine runs (so nothing here depends on how busy the machine is)."""
import time

import pytest

from edgert.timing import alternating, block_means, median_s


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    slept = []
    monkeypatch.setattr(time, "sleep", lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    return now, slept


def engine(clock, name, cost, log):
    def fn():
        log.append(name)
        clock[0][0] += cost(len([n for n in log if n == name]))
    return fn


def test_alternating_times_each_call_in_alternating_blocks(clock):
    log = []
    a = engine(clock, "a", lambda i: 1.0, log)
    b = engine(clock, "b", lambda i: 2.0 + i, log)  # slower every call
    ta, tb = alternating([a, b], 3, calls=2)
    assert log == ["a", "a", "b", "b"] * 3
    assert ta == [[1.0, 1.0]] * 3
    assert tb == [[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
    assert block_means(tb) == [3.5, 5.5, 7.5]


def test_flip_reverses_every_other_round_and_settle_sleeps_after_its_fn(clock):
    log = []
    fns = [engine(clock, n, lambda i: 1.0, log) for n in "abc"]
    times = alternating(fns, 4, flip=True, settle={1: 0.5})
    assert log == list("abc" "cba" "abc" "cba")
    assert clock[1] == [0.5] * 4
    assert all(t == [[1.0]] * 4 for t in times)  # the sleep is not in b's time nor in c's


def test_untimed_start_only_for_blocks_of_several_calls(clock):
    log = []
    a = engine(clock, "a", lambda i: 1.0 if i > 2 else 100.0, log)  # the first two calls are slow (cold)
    ta, = alternating([a], 2, calls=3, warmup=2)
    assert ta == [[1.0] * 3] * 2 and len(log) == 2 * (2 + 3)
    log.clear()
    ta, = alternating([engine(clock, "a", lambda i: 1.0, log)], 2, calls=1, warmup=2, warm_s=5.0)
    assert ta == [[1.0], [1.0]] and len(log) == 2  # a one-call block starts timed
    log.clear()
    ta, = alternating([engine(clock, "a", lambda i: 1.0, log)], 1, calls=2, warm_s=3.0)
    assert len(log) == 3 + 2  # 3 s of untimed calls, then two timed


def test_block_s_sizes_each_fns_blocks_by_its_own_speed(clock):
    log = []
    fast = engine(clock, "f", lambda i: 0.001, log)
    slow = engine(clock, "s", lambda i: 0.3, log)
    tf, ts = alternating([fast, slow], 2, block_s=0.1)
    assert [len(b) for b in tf] == [100, 100] and [len(b) for b in ts] == [1, 1]
    assert block_means(tf) == pytest.approx([0.001, 0.001]) and block_means(ts) == pytest.approx([0.3, 0.3])
    log.clear()
    tf, = alternating([engine(clock, "f", lambda i: 0.001, log)], 1, block_s=0.1, max_calls=7)
    assert len(tf[0]) == 7


def test_budget_stops_after_three_rounds_once_spent(clock):
    log = []
    times = alternating([engine(clock, "a", lambda i: 1.0, log)], 10, budget_s=2.5)
    assert len(times[0]) == 3  # the budget was spent after 3 rounds, the least it stops at
    times = alternating([engine(clock, "a", lambda i: 1.0, log)], 10, budget_s=4.5)
    assert len(times[0]) == 5


def test_median_s(clock):
    log = []
    costs = iter([50.0, 3.0, 1.0, 2.0, 9.0, 4.0])
    assert median_s(engine(clock, "a", lambda i: next(costs), log), 5) == 3.0  # 50: the untimed warm-up
