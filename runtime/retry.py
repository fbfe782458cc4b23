"""Loads that failed, each tried again later: the torch server's and the SGLang
plugin's revision watchers keep serving what they have when a revision cannot be
loaded, and try it again after ``first_s``, then at doubling intervals up to ``max_s``,
while the desired state still names it (a download fails while the trainer restarts; a
corrupt checkpoint just fails again, verified before anything serves it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    error: str
    retry_at: float  # on the FailedLoads clock
    delay_s: float


class FailedLoads:
    """What failed to load, by key, and when it may be tried again."""

    def __init__(
        self,
        first_s: float = 10.0,
        max_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(
                f"retry delays first_s={first_s}, max_s={max_s}: need 0 < first <= max"
            )
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self.failures: dict[Hashable, Failure] = {}

    def waiting(self, key: Hashable) -> str | None:
        """The error of ``key``'s last failure while it is not yet to be tried again."""
        failure = self.failures.get(key)
        if failure is None or self.clock() >= failure.retry_at:
            return None
        return failure.error

    def record(self, key: Hashable, error: str) -> float:
        """Record a failure; returns the seconds until ``key`` is tried again."""
        last = self.failures.get(key)
        delay = self.first_s if last is None else min(2 * last.delay_s, self.max_s)
        self.failures[key] = Failure(error, self.clock() + delay, delay)
        return delay

    def clear(self, key: Hashable) -> None:
        self.failures.pop(key, None)

    def errors(self) -> list[str]:
        return sorted(failure.error for failure in self.failures.values())
