"""The local report's headline figure: the final stable revision's concurrent speedup over
no speculation, from its fullest recent window (aurora.runtime.local.report.longest_window)."""

from __future__ import annotations

from typing import Any

import pytest

from aurora.runtime.local.report import longest_window

pytestmark = pytest.mark.unit


def figure(revision: str, since: float, baseline: int, estimate: float = 1.5) -> dict[str, Any]:
    return {"revision": revision, "window_since": since, "comparator_samples": baseline,
            "estimate": estimate, "samples": 2 * baseline}  # fmt: skip


def test_a_window_that_just_restarted_does_not_replace_a_fuller_one_of_the_same_stable() -> None:
    # Given a headline from 60 baseline requests, then a rollback restarts the window
    kept = figure("suffix", since=100.0, baseline=60)
    restarted = figure("suffix", since=500.0, baseline=3, estimate=2.1)
    # then the fuller window stays the headline
    assert longest_window(kept, restarted) is kept
    # until the new window has as many requests of no speculation
    caught_up = figure("suffix", since=500.0, baseline=60, estimate=1.4)
    assert longest_window(kept, caught_up) is caught_up


def test_the_same_window_growing_and_a_new_stable_revision_always_replace_it() -> None:
    kept = figure("r1", since=100.0, baseline=60)
    assert longest_window(kept, figure("r1", since=100.0, baseline=61)) == figure("r1", 100.0, 61)
    fewer = figure("r1", since=100.0, baseline=10)  # the same window, e.g. trimmed
    assert longest_window(kept, fewer) is fewer
    promoted = figure("r2", since=900.0, baseline=2)
    assert longest_window(kept, promoted) is promoted
    # and no figure (stable is plain decoding, or nothing measured yet) clears it
    assert longest_window(kept, None) is None
    assert longest_window(None, promoted) is promoted
