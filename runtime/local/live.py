"""The live terminal view of `aurora local` (rich): traffic, accept length, measured
speedup, revisions, trainer progress and the latest rollout events."""

from __future__ import annotations

import time
from typing import Any

from aurora.runtime.local.report import LocalRun, fmt


class LiveView:
    """A rich live table: traffic, accept length, measured speedup, revisions, events."""

    def __init__(self, run: LocalRun) -> None:
        from rich.live import Live

        self.run = run
        self.live = Live(self._render(), refresh_per_second=2, transient=False)
        self.live.start()

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        run = self.run
        last = run.timeline[-1] if run.timeline else None
        table = Table(title="aurora local", show_header=False, expand=False)
        table.add_row("elapsed", f"{time.time() - run.started:,.0f} s")
        table.add_row("requests", f"{run.requests} ({run.failed} failed), phase {run.phase or '-'}")
        table.add_row("stable", str(run.state.stable_revision))
        table.add_row("candidate", f"{run.state.candidate_revision or '-'} ({run.state.phase})")
        if last:
            table.add_row("accept length (stable)", fmt(last.accept_length))
            table.add_row(
                "speedup vs no speculation",
                f"stable {fmt(last.speedup)}x, candidate {fmt(last.candidate_speedup)}x",
            )
        t = run.trainer
        if t:
            table.add_row(
                "trainer",
                f"step {t.get('step')}, traces {t.get('traces_seen')}, "
                f"loss {fmt(_float(t.get('loss')))}, lag {t.get('lag')}",
            )
        table.add_row("policy", run.last_reason[:110])
        events = Table(title="rollout events", show_header=True)
        for col in ("t", "action", "revision", "reason"):
            events.add_column(col)
        for e in run.events[-6:]:
            events.add_row(f"{e['t']:.0f}s", e["action"], str(e["revision"]), e["reason"][:80])
        return Group(table, events)

    def refresh(self) -> None:
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
