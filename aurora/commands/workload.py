"""`aurora workload`: the built-in prompt domains and what a traffic schedule produces."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from aurora.errors import UsageError
from aurora.runtime.workloads import DEFAULT_SCHEDULE, Schedule  # stdlib only: keeps --help fast

SCHEDULE_HELP = (
    "phases separated by commas: DOMAIN:COUNT runs COUNT requests of one domain, "
    "DOMAIN=W+DOMAIN=W:COUNT draws COUNT requests in those proportions, file:PATH is a JSONL "
    "file of prompts (e.g. 'code:300,prose:300', 'code=0.8+prose=0.2:200', 'file:my.jsonl:50')"
)
PREVIEW_CHARS = 70


def add_schedule_arguments(
    parser: argparse.ArgumentParser, default: str | None = DEFAULT_SCHEDULE
) -> None:
    """Add `--schedule`, `--schedule-file` and `--seed` to a command that generates traffic;
    read them back with `schedule_from_args`."""
    group = parser.add_mutually_exclusive_group()
    shown = f" (default: {default})" if default else ""
    group.add_argument("--schedule", metavar="SPEC", help=SCHEDULE_HELP + shown)
    group.add_argument(
        "--schedule-file",
        metavar="PATH",
        help="YAML or JSON list of phases, each {requests: N, domain: D} or "
        "{requests: N, mix: {D: weight, ...}} with an optional name",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the prompt order (default: 0)"
    )
    parser.set_defaults(schedule_default=default)


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    """The schedule named by `--schedule` / `--schedule-file`, else the command's default."""
    if args.schedule_file:
        return Schedule.from_file(args.schedule_file)
    spec = args.schedule or args.schedule_default
    if not spec:
        raise UsageError("no schedule given; pass --schedule SPEC or --schedule-file PATH")
    return Schedule.from_string(spec)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "workload",
        help="list prompt domains and preview traffic schedules",
        description="Prompt workloads used to drive traffic: built-in domains (code: HumanEval, "
        "prose: standard-library documentation, math: word problems, chat: instructions) and "
        "user JSONL files, arranged into schedules whose phases shift traffic between domains.",
    )
    sub = parser.add_subparsers(dest="workload_command", metavar="ACTION", required=True)

    listing = sub.add_parser(
        "domains",
        help="list built-in domains with prompt counts and an example",
        description="List the built-in prompt domains with how many prompts each has and one example.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON (full example text)")
    listing.set_defaults(handler=_domains)

    show = sub.add_parser(
        "show",
        help="preview the requests a schedule produces",
        description="Print the requests a schedule produces under a seed, in order: index, phase, "
        "domain, prompt id and the start of the prompt; then requests per phase and domain. "
        "The same schedule and seed always give the same requests.",
    )
    add_schedule_arguments(show)
    show.add_argument("--limit", type=int, metavar="N", help="print only the first N requests")
    show.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per request, with the full prompt",
    )
    show.set_defaults(handler=_show)


def _domains(args: argparse.Namespace) -> int:
    from aurora.runtime import workloads

    examples = {name: workloads.load_domain(name) for name in workloads.BUILTIN_DOMAINS}
    if args.json:
        rows = [
            {
                "domain": name,
                "prompts": len(prompts),
                "example_id": prompts[0].id,
                "example": prompts[0].text,
            }
            for name, prompts in examples.items()
        ]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Built-in prompt domains")
    table.add_column("domain", style="bold")
    table.add_column("prompts", justify="right")
    table.add_column("example")
    for name, prompts in examples.items():
        example = f"[dim]{escape(prompts[0].id)}[/dim]\n{escape(_preview(prompts[0].text, 200))}"
        table.add_row(name, str(len(prompts)), example)
    Console().print(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise UsageError(
            f"--limit {args.limit} is negative; pass a count of requests to print, e.g. --limit 20"
        )
    schedule = schedule_from_args(args)
    requests = list(schedule.requests(args.seed))
    shown = requests if args.limit is None else requests[: args.limit]
    if args.json:
        for request in shown:
            prompt = request.prompt
            record = {
                "index": request.index,
                "phase": request.phase,
                "domain": prompt.domain,
                "id": prompt.id,
                "text": prompt.text,
                "messages": prompt.messages,
            }
            print(json.dumps(record, ensure_ascii=False))
        return 0
    phase_width = max(5, *(len(p.name) for p in schedule.phases))
    id_width = max([2, *(len(r.prompt.id) for r in shown)])
    print(f"{'index':>5}  {'phase':<{phase_width}}  {'domain':<8}  {'id':<{id_width}}  prompt")
    for request in shown:
        prompt = request.prompt
        print(
            f"{request.index:>5}  {request.phase:<{phase_width}}  {prompt.domain:<8}  "
            f"{prompt.id:<{id_width}}  {_preview(prompt.text, PREVIEW_CHARS)}"
        )
    if len(shown) < len(requests):
        print(f"... {len(requests) - len(shown)} more (showing {len(shown)} of {len(requests)})")
    print(f"\nschedule {schedule} (seed {args.seed}): {len(requests)} requests")
    for number, (phase, start) in enumerate(
        zip(schedule.phases, schedule.phase_boundaries(), strict=True)
    ):
        per_domain = Counter(r.prompt.domain for r in requests[start : start + phase.requests])
        counts = ", ".join(f"{domain} {n}" for domain, n in per_domain.most_common())
        print(
            f"  phase {number + 1} {phase.name!r} from request {start}: {phase.requests} requests ({counts})"
        )
    return 0


def _preview(text: str, width: int) -> str:
    """One line: newlines and tabs escaped, cut to `width` characters with an ellipsis."""
    flat = text.strip().replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
