#!/usr/bin/env bash
# One device call runs every GPU line of this project (~8 min on one H200), in priority order:
#   1 kernels_24 (2:4 Triton kernels)   2 sparsegpt_8b (SparseGPT, Llama-3-8B shapes, 128 x 2048)
#   3 structured_bench latency (width 25%/50%, layer drop vs dense, Llama-3-8B, bf16)
#   4 moe_gpu (REAP + SparseGPT, Qwen3-MoE shapes)   5 alps_layer_gpu (ALPS vs SparseGPT, one 8B layer)
#   6 heal_gpu (masked-LoRA heal steps, Llama-3-8B shape; timed part extrapolated to 500 steps)
#
# On the device (the `run` tool), from the repository root, after `bash benchmarks/gpu_prep.sh` here:
#     command: bash benchmarks/gpu_session.sh      carry: ["benchmarks/_wheels"]      timeout_s: 560
# Here, on the CPU (tiny shapes, every line's --smoke path; proves each line starts and writes its table):
#     SMOKE=1 OUT=/tmp/gpuout PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
#
# The device image's python3 has torch/transformers/triton/accelerate but not this project's install:
# the lines run from the working tree (PYTHONPATH=$PWD, nothing pip-installed). greenlet (true-sequential
# calibration) is not in the image: gpu_prep.sh downloads its wheel into benchmarks/_wheels (git-ignored),
# which this script installs into a temporary folder when present.
#
# Each line runs under its own `timeout` (its cap, or what is left of BUDGET_S if less; a line with under
# 20 s left is skipped); a failure or overrun is recorded and the next line runs. Writes to $OUT (at most 8
# files come back from the device): NN_name.log per line (stdout, then stderr), gpu_results.md (every
# table with the exact command, ready to paste into benchmarks/RESULTS.md), kernels_24_results.json.
set -u
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/gpuout}
BUDGET_S=${BUDGET_S:-490}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/_wheels}
mkdir -p "$OUT"
WORK=/tmp/gpu_session_work   # fixed, so the commands recorded in gpu_results.md are exact
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
START=$(date +%s)
MD="$OUT/gpu_results.md"

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl && export PYTHONPATH="$WORK/site" || echo "wheel install from $WHEELS failed" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ENV_LINE=$("$PY" - <<'EOF' 2>&1
import importlib.util, platform
import torch
parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
for name in ("transformers", "triton", "accelerate"):
    try:
        parts.append(f"{name} {__import__(name).__version__}")
    except ImportError:
        parts.append(f"{name} MISSING")
missing = [n for n in ("greenlet", "datasets", "lm_eval", "huggingface_hub", "matplotlib")
           if importlib.util.find_spec(n) is None]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
print(f"{gpu}; " + ", ".join(parts) + f"; not importable: {', '.join(missing) or 'none'}")
EOF
)
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
echo "gpu_session: $ENV_LINE; commit $GIT_REV; SMOKE=$SMOKE; budget ${BUDGET_S}s"
case $ENV_LINE in *greenlet*) echo "WARNING: greenlet is not importable: lines 2-5 (true-sequential calibration) will" \
    "fail; run benchmarks/gpu_prep.sh on the CPU machine and name benchmarks/_wheels in the run's carry" >&2 ;; esac
{
    echo "## GPU session ($(date -u +%Y-%m-%d), \`benchmarks/gpu_session.sh\`$([ "$SMOKE" = 1 ] && echo ', SMOKE=1: CPU, tiny shapes, not figures'))"
    echo
    echo "Environment: $ENV_LINE; commit $GIT_REV. Every command below ran from the repository root with"
    echo "\`PYTHONPATH=\$PWD\` (and the carried greenlet wheel), under the image's \`$PY\`."
} > "$MD"

SUMMARY=()

# line NUM NAME CAP_S KIND TITLE -- CMD...   (KIND: md = the script prints markdown tables; text; kernels)
line() {
    local num=$1 name=$2 cap=$3 kind=$4 title=$5
    shift 6
    local log="$OUT/${num}_${name}.log" left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    local cmd="PYTHONPATH=\$PWD $*"
    printf '\n==================== %s. %s (limit %ss, %ss of the budget left) ====================\n%s\n' \
        "$num" "$title" "$limit" "$left" "$cmd"
    { echo; echo "### $num. $title"; echo; echo "Command: \`$cmd\`"; echo; } >> "$MD"
    if [ "$limit" -lt 20 ]; then
        echo "SKIPPED: ${left}s of the session budget left" | tee "$log"
        echo "Skipped: the session budget (${BUDGET_S}s) was spent by the lines above." >> "$MD"
        SUMMARY+=("$num $name: skipped (budget)")
        return
    fi
    local t0=$(date +%s)
    set -o pipefail
    timeout -k 10 "$limit" "$@" 2> "$WORK/err" | tee "$WORK/out"
    local rc=$?
    set +o pipefail
    local secs=$(($(date +%s) - t0))
    { echo "# $cmd"; echo "# rc $rc, ${secs}s (limit ${limit}s)"; cat "$WORK/out"; echo "--- stderr ---";
      tail -n 400 "$WORK/err"; } > "$log"
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT at ${limit}s"; elif [ "$rc" -ne 0 ]; then status="FAILED (rc $rc)"; fi
    echo "--- $num $name: $status, ${secs}s ---"
    [ "$rc" -ne 0 ] && tail -n 15 "$WORK/err"
    echo "Result: $status, ${secs}s wall (log: \`${num}_${name}.log\`)." >> "$MD"
    echo >> "$MD"
    case $kind in
        md) grep -vE '^(\||#### |$)' "$WORK/out" | sed 's/^/    /' >> "$MD"
            echo >> "$MD"
            grep -E '^(\||#### )' "$WORK/out" | sed 's/^#### \(.*\)$/\n**\1**\n/' >> "$MD" ;;
        text) { echo '```text'; cat "$WORK/out"; echo '```'; } >> "$MD" ;;
        kernels) grep -E '^(device |summary|e2e )' "$WORK/out" | sed 's/$/  /' >> "$MD"
                 echo >> "$MD"
                 if [ -f "$WORK/kernels_24/table.md" ]; then cat "$WORK/kernels_24/table.md" >> "$MD"
                 else { echo '```text'; cat "$WORK/out"; echo '```'; } >> "$MD"; fi   # stopped early: the rows it printed
                 [ -f "$WORK/kernels_24/results.json" ] && cp "$WORK/kernels_24/results.json" "$OUT/kernels_24_results.json" ;;
    esac
    if [ "$rc" -ne 0 ] && [ -s "$WORK/err" ]; then { echo; echo '```text'; tail -n 15 "$WORK/err"; echo '```'; } >> "$MD"; fi
    SUMMARY+=("$num $name: $status, ${secs}s")
}

if [ "$SMOKE" = 1 ]; then
    line 1 kernels_24 120 kernels "2:4 Triton kernels vs cuBLAS (smoke)" -- \
        "$PY" benchmarks/kernels_24.py --smoke --out "$WORK/kernels_24"
    line 2 sparsegpt_8b 120 text "SparseGPT, Llama-3-8B shapes (smoke)" -- \
        "$PY" benchmarks/sparsegpt_8b.py --smoke --methods sparsegpt
    line 3 structured_latency 120 md "Structured pruning decode latency (smoke)" -- \
        "$PY" benchmarks/structured_bench.py --latency-only --latency-model 512x4 --device cpu --dtype float32 --repeats 1
    line 4 moe_gpu 120 text "REAP + SparseGPT, Qwen3-MoE shapes (smoke)" -- \
        "$PY" benchmarks/moe_gpu.py --smoke --layers 2 --device cpu
    line 5 alps_layer 120 md "ALPS vs SparseGPT, one Llama-3-8B layer (smoke)" -- \
        "$PY" benchmarks/alps_layer_gpu.py --smoke
    line 6 heal_lora 120 md "Masked-LoRA heal steps, Llama-3-8B shape (smoke)" -- \
        "$PY" benchmarks/heal_gpu.py --smoke
else
    # guesses (no H200 run yet): ~60-90 / 100 / 60 / 70 / 40 / 60 s; caps below; BUDGET_S trims the later lines
    line 1 kernels_24 120 kernels "2:4 Triton kernels vs cuBLAS, Llama-3-8B linears (6 M values; e2e eager, 64 tokens)" -- \
        "$PY" benchmarks/kernels_24.py --ms 1,4,16,64,512,2048 --no-compile --new-tokens 64 --out "$WORK/kernels_24"
    line 2 sparsegpt_8b 170 text "SparseGPT 50%, Llama-3-8B shapes, 128 x 2048 calibration (16 of 32 layers; 32-layer estimate)" -- \
        "$PY" benchmarks/sparsegpt_8b.py --device cuda --methods sparsegpt --layers 16
    line 3 structured_latency 100 md "Structured pruning latency vs dense, random-init Llama-3-8B, bf16 (3 repeats)" -- \
        "$PY" benchmarks/structured_bench.py --latency-only --latency-model llama3-8b --device cuda --dtype bfloat16 --repeats 3
    line 4 moe_gpu 100 text "REAP (keep 64 of 128 experts) + SparseGPT 50%, Qwen3-30B-A3B layer shapes (4 layers), 128 x 2048" -- \
        "$PY" benchmarks/moe_gpu.py --layers 4 --device cuda
    line 5 alps_layer 80 md "ALPS vs SparseGPT, one Llama-3-8B-shaped layer, 128 x 2048 calibration" -- \
        "$PY" benchmarks/alps_layer_gpu.py --device cuda
    line 6 heal_lora 100 md "Masked-LoRA heal (rank 8, batch 8 x 256), Llama-3-8B shape, bf16: 60 timed steps, 500 extrapolated" -- \
        "$PY" benchmarks/heal_gpu.py --device cuda --steps 60 --warm-steps 5 --target-steps 500
fi

TOTAL=$(($(date +%s) - START))
{ echo; echo "Session wall time: ${TOTAL}s of a ${BUDGET_S}s budget."; } >> "$MD"
printf '\n==================== summary (%ss) ====================\n' "$TOTAL"
printf '%s\n' "${SUMMARY[@]}"
echo "wrote: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
