#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU and no network: install from this working tree, run the GPU
# parity tests, run the benchmarks, build the report. Everything lands in one folder:
#   gpu_check.log  every stage's output, with a header per stage
#   summary.txt    one line per stage: status, exit code, seconds
#   bench.json     pytest-benchmark JSON of all bench files (extra_info per case: impl, shape, dtype, peak memory, achieved rate)
#   report.md      side-by-side tables (python -m bench.report), <op>.png  time and memory against size
#
# Usage:  bench/gpu_check.sh [OUT_DIR]          (default: $OUT, else bench/results/gpu)
# Environment:
#   PYTHON                  the interpreter that has a CUDA torch (default python3)
#   WHEEL_DIR               wheels of missing peers/dependencies, installed offline (default .whl)
#   GPU_CHECK_TESTS         pytest arguments of the parity stage (default: the op test files, quick shape set)
#   KARMA_FULL_TESTS=1      full shape set in the parity stage (slower)
#   KARMA_BENCH_QUICK=1     quick benchmark shapes (the default here is the full, GPU-sized set)
#   GPU_CHECK_SKIP_INSTALL=1  use the package as already installed / importable from the tree
# Stage time limits in seconds (LIMIT_INSTALL, LIMIT_TESTS, LIMIT_BENCH_TOTAL for all bench files with at most
# LIMIT_BENCH each, LIMIT_REPORT; env and peers 20 each) add up to 8 minutes, so the run ends within 8 minutes
# whatever happens; on an H200 it normally ends well before.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=$(mkdir -p "${1:-${OUT:-bench/results/gpu}}" && cd "${1:-${OUT:-bench/results/gpu}}" && pwd)
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
LIMIT_INSTALL=${LIMIT_INSTALL:-90}
LIMIT_TESTS=${LIMIT_TESTS:-90}
LIMIT_BENCH_TOTAL=${LIMIT_BENCH_TOTAL:-240}   # all bench files together
LIMIT_BENCH=${LIMIT_BENCH:-120}               # one bench file, at most
LIMIT_REPORT=${LIMIT_REPORT:-20}
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: >"$LOG"
: >"$SUMMARY"
FAILED=0

# stage NAME LIMIT_S COMMAND...: run with a time limit (SIGINT first, so pytest still prints where it was),
# append the output to the log, and record the outcome; a failed stage does not stop the later ones.
stage() {
    local name=$1 limit=$2
    shift 2
    printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=30 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status=FAILED; fi
    [ "$status" = ok ] || FAILED=1
    printf '%-22s %-8s rc=%-3s %4ss\n' "$name" "$status" "$rc" "$((SECONDS - start))" | tee -a "$SUMMARY" "$LOG"
    return 0
}

stage env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
    $PYTHON -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, \"triton\", triton.__version__)'"

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
    if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        # --no-deps: nothing can be resolved from an index here; the folder must hold what the peers need.
        stage wheels "$LIMIT_INSTALL" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
            --find-links "$WHEEL_DIR" "$WHEEL_DIR"/*.whl
    fi
    stage install "$LIMIT_INSTALL" env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" -m pip install -q \
        --no-index --no-deps --no-build-isolation -e .
fi

stage peers 20 "$PYTHON" - <<'PY'
import importlib
for module in ("karma_kernels._C", "liger_kernel", "cut_cross_entropy", "inf_cl", "faiss", "pytest_benchmark",
               "matplotlib"):
    try:
        importlib.import_module(module)
        print(f"{module:20s} available")
    except Exception as error:  # a peer that is absent is reported, and its benchmarks skip
        print(f"{module:20s} MISSING ({type(error).__name__}: {error})")
PY

if [ -n "${GPU_CHECK_TESTS:-}" ]; then
    read -r -a TEST_ARGS <<<"$GPU_CHECK_TESTS"
else
    TEST_ARGS=()
    for pattern in "tests/test_contrastive*.py" "tests/test_linear_ce*.py" "tests/test_topk*.py"; do
        for file in $pattern; do [ -e "$file" ] && TEST_ARGS+=("$file"); done
    done
    [ ${#TEST_ARGS[@]} -gt 0 ] || TEST_ARGS=(tests -m gpu)
fi
stage tests "$LIMIT_TESTS" "$PYTHON" -m pytest "${TEST_ARGS[@]}" -q -rs --maxfail=20 -p no:cacheprovider

# One pytest run per bench file, each with its own JSON and time limit: a file that overruns is interrupted
# (SIGINT: pytest-benchmark still writes the cases it finished) and the next file gets the remaining budget.
PARTS=$(mktemp -d)
BENCH_DEADLINE=$((SECONDS + LIMIT_BENCH_TOTAL))
for bench_file in bench/bench_*.py; do
    name=$(basename "$bench_file" .py)
    remaining=$((BENCH_DEADLINE - SECONDS))
    if [ "$remaining" -lt 15 ]; then
        printf '%-22s SKIPPED  (bench time budget spent)\n' "$name" | tee -a "$SUMMARY" "$LOG"
        FAILED=1
        continue
    fi
    stage "$name" "$((remaining < LIMIT_BENCH ? remaining : LIMIT_BENCH))" "$PYTHON" -m pytest "$bench_file" --benchmark-only -q -rs -p no:cacheprovider \
        --benchmark-json="$PARTS/$name.json" --benchmark-columns=min,median,max,rounds
done

if compgen -G "$PARTS/*.json" >/dev/null; then
    stage report "$LIMIT_REPORT" "$PYTHON" -m bench.report "$PARTS"/*.json --out "$OUT_DIR" \
        --merged-json "$OUT_DIR/bench.json"
else
    echo "report   SKIPPED  (no benchmark JSON)" | tee -a "$SUMMARY" "$LOG"
    FAILED=1
fi
rm -rf "$PARTS"

echo
echo "gpu_check: results in $OUT_DIR"
cat "$SUMMARY"
exit "$FAILED"
