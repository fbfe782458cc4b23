"""FailedLoads: a failed load is tried again after 10 s, doubling to 300 s."""

from __future__ import annotations

import pytest

from aurora.runtime.retry import FailedLoads

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_load_waits_doubling_delays_until_it_loads() -> None:
    clock = Clock()
    failed = FailedLoads(first_s=10, max_s=30, clock=clock)
    key = ("r1", "/ckpt/r1")
    assert failed.waiting(key) is None  # never failed: try it
    # a failure: not tried again for 10 s, and its error is what is reported meanwhile
    assert failed.record(key, "cannot load revision 'r1': missing") == 10
    clock.now += 9.9
    assert failed.waiting(key) == "cannot load revision 'r1': missing"
    assert failed.waiting(("r1", "/elsewhere")) is None  # another path is another load
    clock.now += 0.1
    assert failed.waiting(key) is None
    # each further failure doubles the delay, up to max_s
    assert [failed.record(key, "again") for _ in range(3)] == [20, 30, 30]
    assert failed.errors() == ["again"]
    # once it loads, it is forgotten: a later failure starts from first_s again
    failed.clear(key)
    assert failed.errors() == [] and failed.record(key, "x") == 10
    with pytest.raises(ValueError, match="first_s=0"):
        FailedLoads(first_s=0)
