"""What an `aurora local` run records (`LocalRun`, one `Sample` per rollout tick) and the
report folder written from it: report.json, report.md and timeline.png."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aurora.runtime.local.config import LocalConfig
from aurora.runtime.rollout import NO_DRAFT, Measurement, RolloutState, Speedup


@dataclass
class Sample:
    """One point of the timeline, read off the live stats."""

    t: float
    requests: int
    failed: int
    stable: str | None
    candidate: str | None
    accept_length: float | None
    speedup: float | None  # stable's decode throughput over the no-speculation baseline
    speedup_samples: int  # requests behind it: the smaller of the two arms
    candidate_speedup: float | None
    phase: str


@dataclass
class LocalRun:
    config: LocalConfig
    started: float = field(default_factory=time.time)
    requests: int = 0
    failed: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[Sample] = field(default_factory=list)
    phase: str = ""
    state: RolloutState = field(default_factory=RolloutState)
    trainer: dict[str, str] = field(default_factory=dict)
    last_reason: str = ""
    promotion_requests: list[int] = field(default_factory=list)  # requests done at each
    # per revision: when it was published, decided and confirmed by every server (epoch s)
    swaps: dict[str, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the latest gated figure of the stable revision over no speculation (`stable_figure`)
    final: dict[str, Any] | None = None


def _comparison(speedup: Speedup | None, m: Measurement) -> dict[str, Any] | None:
    """A gated speedup as the report keeps it: estimate, bounds, comparator, window, counts."""
    if speedup is None:
        return None
    return {
        "comparator": speedup.comparator,
        "estimate": speedup.estimate,
        "lower": speedup.lower,
        "upper": speedup.upper,
        "confidence": m.confidence,
        "samples": speedup.samples,
        "comparator_samples": speedup.comparator_samples,
        "window_since": m.window_since,
        "window_seconds": m.window_seconds,
        "window_restarts": m.window_restarts,
    }


def decision_figures(action: str, m: Measurement | None) -> dict[str, Any]:
    """The figures behind a rollout event: `gated`, the comparison the decision was made
    on (the candidate against stable; stable against no speculation for a fallback), and
    `speedup_vs_no_speculation` beside it, on the same window."""
    if m is None:
        return {}
    if action in ("Promote", "Rollback", "Hold"):
        figures = {
            "gated": _comparison(m.speedup_vs_stable, m),
            "speedup_vs_no_speculation": _comparison(m.candidate_speedup_vs_baseline, m),
        }
    elif action == "Fallback":
        plain = _comparison(m.stable_speedup_vs_baseline, m)
        figures = {"gated": plain, "speedup_vs_no_speculation": plain}
    else:
        return {}
    return {key: value for key, value in figures.items() if value is not None}


def stable_figure(m: Measurement | None) -> dict[str, Any] | None:
    """The stable revision's speedup over no speculation, concurrent and gated (None
    while it has none; when stable is no draft it is plain decoding itself)."""
    if m is None or m.stable.revision in (None, NO_DRAFT):
        return None
    figure = _comparison(m.stable_speedup_vs_baseline, m)
    return None if figure is None else {"revision": m.stable.revision, **figure}


def longest_window(
    kept: dict[str, Any] | None, latest: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The headline figure to keep: the latest one, unless the stable revision is the same
    and its comparison window has just restarted (after a rollback, or a traffic-mix change)
    with fewer requests of no speculation than the window kept; then the kept, fuller window
    stands until the new one has caught up. Either way the figure quotes its own window."""
    if kept is None or latest is None or latest["revision"] != kept["revision"]:
        return latest
    restarted = latest["window_since"] != kept["window_since"]
    if restarted and latest["comparator_samples"] < kept["comparator_samples"]:
        return kept
    return latest


def quote(figure: dict[str, Any]) -> str:
    """A gated figure in words: estimate, bounds, comparator, counts and window."""
    text = (
        f"{figure['estimate']:.2f}x vs {figure['comparator']} "
        f"({figure['confidence']:.1%} confidence sequence {figure['lower']:.2f}x-"
        f"{figure['upper']:.2f}x, time-weighted; {figure['samples']} / "
        f"{figure['comparator_samples']} requests in the window "
    )
    if figure["window_since"] is not None:
        since = datetime.fromtimestamp(figure["window_since"], UTC).strftime("%H:%M:%S UTC")
        text += f"since {since}, "
    text += f"{figure['window_seconds']:.0f} s"
    if figure["window_restarts"]:
        text += f", restarted {figure['window_restarts']}x by a traffic-mix change"
    return text + ")"


def fmt(value: Any) -> str:
    """A figure with two decimals, or "-" when there is none."""
    return "-" if value is None else f"{value:.2f}"


def write_report(run: LocalRun, folder: Path) -> Path:
    """report.json, report.md and timeline.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    timeline = [asdict(s) for s in run.timeline]
    promotions = [e for e in run.events if e["action"] == "Promoted"]
    rollbacks = [e for e in run.events if e["action"] in ("Rollback", "Reject")]
    fallbacks = [e for e in run.events if e["action"] == "Fallback"]
    shifts = [e for e in run.events if e["action"] == "TrafficShift"]
    swaps = swap_latencies(run.swaps)
    # a candidate that waited for a running canary to end measures the policy, not the swap
    prompt = 2 * run.config.interval_s
    to_serving = [
        s["publish_to_all_serving_s"]
        for s in swaps
        if "publish_to_all_serving_s" in s and s["waited_for_policy_s"] <= prompt
    ]
    summary = {
        "duration_s": (run.timeline[-1].t if run.timeline else 0.0),
        "requests": run.requests,
        "failed_requests": run.failed,
        "promotions": len(promotions),
        "rollbacks_or_rejections": len(rollbacks),
        "final_stable": run.state.stable_revision,
        # the headline: the final stable revision over no speculation, concurrent and gated
        "final_stable_speedup_vs_no_speculation": run.final,
        "decisions": [e for e in run.events if "gated" in e],
        "first_promotion_s": promotions[0]["t"] if promotions else None,
        "fallbacks": len(fallbacks),
        "traffic_shift_s": shifts[0]["t"] if shifts else None,
        "max_checkpoint_to_all_servers_s": max(to_serving) if to_serving else None,
        "swaps": swaps,
        "trainer": run.trainer,
        "config": {k: str(v) for k, v in asdict(run.config).items() if k != "rollout"},
        "rollout": run.config.rollout.model_dump(mode="json"),
    }
    (folder / "report.json").write_text(
        json.dumps({"summary": summary, "events": run.events, "timeline": timeline}, indent=2)
    )
    if run.final is not None:
        headline = f"{run.final['revision']}, {quote(run.final)}"
    elif run.state.stable_revision in (None, NO_DRAFT):
        headline = f"{NO_DRAFT} (plain decoding: no speedup to measure)"
    else:
        headline = f"{run.state.stable_revision} (no concurrent figure against no speculation yet)"
    lines = [
        "# aurora local report",
        "",
        f"- requests: {run.requests} ({run.failed} failed)",
        f"- promotions: {len(promotions)}, rollbacks/rejections: {len(rollbacks)}, "
        f"fallbacks to plain decoding: {len(fallbacks)}",
        f"- final stable revision: {headline}",
        f"- traffic shift at: {fmt(summary['traffic_shift_s'])} s",
        f"- trainer checkpoint to every server serving it: at most "
        f"{fmt(summary['max_checkpoint_to_all_servers_s'])} s over {len(to_serving)} canaries "
        "that did not wait for another canary to end",
        "",
        "## Swaps (seconds)",
        "",
        "| revision | checkpoint to all servers | of which waiting for the policy | "
        "canary decision to all servers | stable decision to all servers |",
        "|---|---|---|---|---|",
        *[
            f"| {s['revision']} | {fmt(s.get('publish_to_all_serving_s'))} | "
            f"{fmt(s.get('waited_for_policy_s'))} | "
            f"{fmt(s.get('canary_decision_to_all_serving_s'))} | "
            f"{fmt(s.get('stable_decision_to_all_serving_s'))} |"
            for s in swaps
        ],
        "",
        "## Rollout decisions and the gated figure behind each",
        "",
        "| t (s) | action | revision | gated figure | over no speculation |",
        "|---|---|---|---|---|",
        *[
            f"| {e['t']:.0f} | {e['action']} | {e['revision']} | {quote(e['gated'])} | "
            + (quote(e["speedup_vs_no_speculation"]) if "speedup_vs_no_speculation" in e else "-")
            + " |"
            for e in run.events
            if "gated" in e
        ],
        "",
        "## Rollout events",
        "",
        "| t (s) | action | revision | reason |",
        "|---|---|---|---|",
        *[
            f"| {e['t']:.0f} | {e['action']} | {e['revision']} | {e['reason']} |"
            for e in run.events
        ],
        "",
        "![timeline](timeline.png)",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
    _plot(run, folder / "timeline.png")
    return folder


def swap_latencies(swaps: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per revision, seconds from publication (canaries) and from each rollout decision to
    the moment every server served it."""
    rows = []
    for revision, record in swaps.items():
        row: dict[str, Any] = {"revision": revision}
        if "published" in record and "canary_serving" in record:
            row["publish_to_all_serving_s"] = record["canary_serving"] - record["published"]
            row["waited_for_policy_s"] = max(0.0, record["canary_decided"] - record["published"])
        for role in ("canary", "stable"):
            if f"{role}_decided" in record and f"{role}_serving" in record:
                row[f"{role}_decision_to_all_serving_s"] = max(
                    0.0, record[f"{role}_serving"] - record[f"{role}_decided"]
                )
        rows.append(row)
    return rows


def _plot(run: LocalRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ts = [s.t for s in run.timeline]
    ax1.plot(
        ts,
        [s.accept_length if s.accept_length is not None else float("nan") for s in run.timeline],
        label="accept length (stable)",
    )
    ax1.set_ylabel("tokens / verify step")
    ax2.plot(
        ts,
        [s.speedup if s.speedup is not None else float("nan") for s in run.timeline],
        label="stable vs no speculation",
    )
    ax2.plot(
        ts,
        [
            s.candidate_speedup if s.candidate_speedup is not None else float("nan")
            for s in run.timeline
        ],
        label="candidate vs no speculation",
        alpha=0.7,
    )
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("measured speedup")
    ax2.set_xlabel("seconds")
    order = {"StartCanary": 0, "Rollback": 1, "Reject": 1, "Fallback": 1, "Promoted": 2}
    for e in sorted(run.events, key=lambda e: order.get(e["action"], 0)):  # promotions on top
        color = {
            "Promoted": "green",
            "Rollback": "red",
            "Reject": "red",
            "Fallback": "purple",
            "StartCanary": "orange",
            "TrafficShift": "blue",
        }.get(e["action"])
        if color:
            for ax in (ax1, ax2):
                ax.axvline(e["t"], color=color, ls="--", lw=0.8)
    phases = [
        (s.t, s.phase)
        for i, s in enumerate(run.timeline)
        if i == 0 or s.phase != run.timeline[i - 1].phase
    ]
    for t, phase in phases:
        ax1.annotate(phase, (t, 1.0), fontsize=8, color="purple")
    ax1.legend(loc="upper left")
    ax2.legend(loc="upper left")
    fig.suptitle(
        "aurora local: green = promoted, red = rolled back/rejected, purple = fallback,\n"
        "orange = canary start, blue = traffic shift"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
