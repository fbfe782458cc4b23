"""Compare `aurora local` runs on the same traffic after the traffic shift: how long the
post-shift requests took, the share of that time a learned candidate was on canary, and
each canary's outcome with its gated speedup against the stable revision.

    python scripts/compare_demo_reports.py RUN/report.json OTHER/report-summary.json ...

Reads report.json (the report folder's) or report-summary.json (its summary, events and
timeline, as committed under benchmarks/results/). Prints one JSON object per run."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path


def compare(path: Path) -> dict[str, object]:
    report = json.loads(path.read_text())
    summary, timeline, events = report["summary"], report["timeline"], report["events"]
    shift, end = summary["traffic_shift_s"], summary["duration_s"]
    if shift is None:
        raise SystemExit(f"{path}: no traffic shift in this run")
    at_shift = max((p["requests"] for p in timeline if p["t"] <= shift), default=0)
    after = summary["requests"] - at_shift
    on_canary = sum(
        b["t"] - a["t"]
        for a, b in itertools.pairwise(timeline)
        if a["t"] >= shift and a["candidate"] not in (None, "suffix")
    )
    decided = [e for e in events if e["action"] in ("Promote", "Rollback", "Reject")]
    return {
        "run": str(path),
        "requests": summary["requests"],
        "failed": summary["failed_requests"],
        "shift_s": round(shift),
        "end_s": round(end),
        "requests_after_shift": after,
        "seconds_after_shift": round(end - shift),
        "requests_per_minute_after_shift": round(after / ((end - shift) / 60), 1),
        "share_of_time_after_shift_with_a_learned_canary": round(on_canary / (end - shift), 2),
        "learned_canaries": sum(
            e["action"] == "StartCanary" and e["revision"] != "suffix" for e in events
        ),
        "decisions": [
            [e["t"] // 1, e["action"], e["revision"], round(e["gated"]["estimate"], 3)]
            for e in decided
            if e.get("gated")
        ],
    }


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for argument in sys.argv[1:]:
        print(json.dumps(compare(Path(argument))))
