"""`aurora bench decode --unseen`'s interval of a time-weighted speedup."""

from __future__ import annotations

import pytest

from aurora.runtime.bench_unseen import speedup_interval

pytestmark = pytest.mark.unit


def test_the_speedup_interval_resamples_prompts_with_their_pairs() -> None:
    # Given a method exactly twice as fast as plain on every prompt: no spread at all
    plain = [(64, 4.0), (32, 2.0), (64, 8.0)]
    assert speedup_interval([(t, s / 2) for t, s in plain], plain) == (2.0, 2.0)
    # Given one prompt 3x faster and one no faster (equal seconds): the interval spans the
    # time-weighted ratios of the resampled prompt sets, 1x (only the second) to 3x
    low, high = speedup_interval([(60, 1.0), (60, 3.0)], [(60, 3.0), (60, 3.0)])  # type: ignore[misc]
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)
    # and one prompt gives none
    assert speedup_interval([(8, 1.0)], [(8, 1.0)]) is None
