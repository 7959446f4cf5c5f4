#!/usr/bin/env bash
# One GPU check that fits a short lease: at most 6 minutes in the worst case, everything included (each stage's
# limit plus its kill-after, the two lanes that run side by side counted by the longer; `--plan` prints it).
# Stages, each under its own time limit, each appending its result line to summary.txt the moment it ends, a
# failed stage never stopping the next:
#   env          nvidia-smi, nvcc / CUDA_HOME, torch / CUDA / Triton, ninja / setuptools / wheel / pytest /
#                pytest-benchmark / py-cpuinfo / matplotlib and the peers' versions
#   wheels       .whl/*.whl installed offline into a private folder put on PYTHONPATH (bench/WHEELS.md)
#   lane "build", in the background:
#     install      the C++/CUDA extension built in place (setup.py build_ext --inplace, MAX_JOBS = all cores);
#                  nvcc's CUDA major must match torch's, else the CUDA build is not tried:
#     install_cpu  KARMA_NO_CUDA=1 retry (CPU merge only) when the CUDA build failed or could not match
#   lane "probe", meanwhile (the Triton kernels need no build):
#     probe        python -m bench.gpu_probe: the key numbers first, one JSON line each (probe.jsonl)
#     karma_train  one short `karma train --preset tiny` on the device (the model layer end to end)
#   probe_topk   once the build lane is done: the probe's CUDA-merge section
#   tests        the GPU parity tests first and only: CUDA top-K, ShardedIndex's cuda path, bf16 Triton (GPU_TEST_*)
#   bench_<op>   the GPU cases at the peers' shapes, ours first (KARMA_BENCH_GPU_ONLY=1), rounds sized to fit
#   report       report.md (+ <op>.png) from the bench JSON and the probe
# Output folder (at most 8 files: what the device tool brings back): gpu_check.log (every stage's output),
# summary.txt, probe.jsonl, bench.json, report.md, contrastive.png, linear_ce.png, topk_merge.png.
#
# Usage:  bash bench/gpu_check.sh [--plan] [--quick] [OUT_DIR]      (OUT_DIR default: $OUT, else bench/results/gpu)
#   --plan    print the stages, their budgets and what is missing here; run nothing
#   --quick   rehearsal: no build (the tree as it is), small probe budget, quick bench shapes. Without CUDA every
#             GPU stage skips with its reason (tests: the GPU selection is only collected), so the whole script
#             runs on a CPU machine in about a minute (tests/test_gpu_check.py does, in CI), under 3x the limits
#             (a rehearsal checks the flow, not the timing)
# Environment: PYTHON (default python3), WHEEL_DIR (default .whl), LIMIT_<STAGE> (seconds, e.g. LIMIT_PROBE=80),
#   GPU_CHECK_SKIP_INSTALL=1 (use the tree as it is), MAX_JOBS.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
KILL_AFTER=3             # seconds between a stage's SIGINT and its SIGKILL
TOTAL_BUDGET_S=360       # the worst case, everything included
# stage limits in seconds: the one place they are set (LIMIT_<NAME> overrides one)
STAGES=(env:15 wheels:8 install:90 install_cpu:45 probe:75 karma_train:30 probe_topk:15 tests:50
        bench_contrastive:20 bench_linear_ce:45 bench_topk_merge:15 report:10)
# stages that run side by side: "lane=stage,stage" (the worst case counts the longer lane)
LANES=(build=install,install_cpu probe=probe,karma_train)
# the GPU test selection, in one place: the CUDA top-K parity and the bf16 Triton parity tests, top-K first
GPU_TEST_FILES=(tests/test_topk_merge.py tests/test_retrieval.py tests/test_contrastive.py tests/test_linear_ce.py)
GPU_TEST_SELECT="cuda_matches_reference or test_cuda_path or test_cuda_search"
GPU_TEST_SELECT+=" or (test_triton_path and (B33-M40 or B24-M24))"
GPU_TEST_SELECT+=" or (triton_path_options and bfloat16 and (plain or all_mean or all_none))"
# the versions the env stage prints and --plan checks (import name=distribution name)
PACKAGES="ninja=ninja setuptools=setuptools wheel=wheel pytest=pytest pytest_benchmark=pytest-benchmark \
cpuinfo=py-cpuinfo matplotlib=matplotlib liger_kernel=liger-kernel cut_cross_entropy=cut-cross-entropy inf_cl=inf-cl"

limit_of() {  # limit_of NAME: the stage's limit, LIMIT_<NAME> (upper case) first
    local entry var
    for entry in "${STAGES[@]}"; do
        if [ "${entry%%:*}" = "$1" ]; then
            var="LIMIT_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
            echo "${!var:-${entry##*:}}"
            return
        fi
    done
    echo "gpu_check: unknown stage $1" >&2
    exit 2
}

lane_of() {  # lane_of STAGE: the lane the stage runs in, or nothing
    local lane
    for lane in "${LANES[@]}"; do
        case ",${lane#*=}," in *",$1,"*) echo "${lane%%=*}"; return ;; esac
    done
}

worst_case_s() {  # serial stages' limits + kill-afters, plus the longest lane's
    local entry name total=0 lane lane_total longest=0
    for entry in "${STAGES[@]}"; do
        name=${entry%%:*}
        [ -z "$(lane_of "$name")" ] && total=$((total + $(limit_of "$name") + KILL_AFTER))
    done
    for lane in "${LANES[@]}"; do
        lane_total=0
        for name in $(echo "${lane#*=}" | tr ',' ' '); do lane_total=$((lane_total + $(limit_of "$name") + KILL_AFTER)); done
        [ "$lane_total" -gt "$longest" ] && longest=$lane_total
    done
    echo $((total + longest))
}

versions_py() {  # versions_py [FACTS_FILE]: each package's version (or MISSING); with a file, torch's too,
    # and the facts the later stages need (has_cuda, torch's CUDA major) written to that file
    "$PYTHON" - "$PACKAGES" "$@" <<'PY'
import importlib.metadata as md, importlib.util, sys
for pair in sys.argv[1].split():
    module, dist = pair.split("=")
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = "installed (no metadata)" if importlib.util.find_spec(module) else "MISSING"
    print(f"{dist:20s} {version}")
if len(sys.argv) > 2:
    import torch, triton
    cuda = torch.cuda.is_available()
    print(f"{'torch':20s} {torch.__version__} (CUDA {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name(0) if cuda else 'none'}); triton {triton.__version__}")
    with open(sys.argv[2], "w") as facts:
        facts.write(f"HAS_CUDA={int(cuda)}\nTORCH_CUDA_MAJOR={(torch.version.cuda or '').split('.')[0]}\n")
PY
}

print_env() {  # the env stage: driver, compiler, versions; facts for the later stages into $1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi: absent"
    echo "CUDA_HOME=${CUDA_HOME:-unset}"
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: absent"; fi
    echo "NVCC_MAJOR=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' | head -1)" >>"$1"
    versions_py "$1.py" && cat "$1.py" >>"$1"
}

QUICK=0
PLAN=0
POSITIONAL=()
for arg in "$@"; do
    case "$arg" in
        --plan) PLAN=1 ;;
        --quick) QUICK=1 ;;
        --env) print_env "${*: -1}"; exit $? ;;  # internal: the env stage, run under its time limit
        -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d'; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
        *) POSITIONAL+=("$arg") ;;
    esac
done

if [ "$PLAN" = 1 ]; then
    for entry in "${STAGES[@]}"; do
        lane=$(lane_of "${entry%%:*}")
        printf 'stage %-18s limit=%s kill_after=%s%s\n' "${entry%%:*}" "$(limit_of "${entry%%:*}")" "$KILL_AFTER" \
            "${lane:+ lane=$lane}"
    done
    total=$(worst_case_s)
    echo "worst_case_s=$total budget_s=$TOTAL_BUDGET_S$([ "$total" -gt "$TOTAL_BUDGET_S" ] && echo ' OVER BUDGET')"
    echo "gpu tests: ${GPU_TEST_FILES[*]} -k \"$GPU_TEST_SELECT\""
    echo "wheels in $WHEEL_DIR: $(compgen -G "$WHEEL_DIR/*.whl" | xargs -r -n1 basename | tr '\n' ' ')"
    command -v nvidia-smi >/dev/null || echo "missing: nvidia-smi (no NVIDIA driver: GPU stages will skip)"
    command -v nvcc >/dev/null || echo "missing: nvcc (the CUDA merge will not be built)"
    [ -n "${CUDA_HOME:-}" ] || echo "note: CUDA_HOME unset (torch looks for nvcc on PATH)"
    for dist in $(versions_py | awk '$2 == "MISSING" {print $1}'); do
        if compgen -G "$WHEEL_DIR/${dist//-/_}-*.whl" >/dev/null; then
            echo "missing: $dist (its wheel is in $WHEEL_DIR: the wheels stage installs it)"
        else
            echo "missing: $dist (no wheel in $WHEEL_DIR; bench/WHEELS.md)"
        fi
    done
    exit 0
fi

OUT_DIR=${POSITIONAL[0]:-${OUT:-bench/results/gpu}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
PARTS="$OUT_DIR/parts"
SITE=${TMPDIR:-/tmp}/karma_gpu_check_site
FACTS=$(mktemp "${TMPDIR:-/tmp}/karma_gpu_check_facts.XXXXXX")
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: >"$LOG"
: >"$SUMMARY"
rm -rf "$PARTS" "$OUT_DIR/probe.jsonl"
FAILED=0
# a rehearsal on a CPU machine checks the flow, not the timing: a loaded CI machine gets 3x the limits
LIMIT_SCALE=1
[ "$QUICK" = 1 ] && ! nvidia-smi -L >/dev/null 2>&1 && LIMIT_SCALE=3
WORST=$(worst_case_s)
echo "gpu_check: worst case $WORST s (budget $TOTAL_BUDGET_S s$([ "$WORST" -gt "$TOTAL_BUDGET_S" ] && echo ', OVER BUDGET:'\
' LIMIT_* overrides')), quick=$QUICK, out $OUT_DIR" | tee -a "$LOG"

record() {  # record NAME STATUS RC SECONDS [NOTE]
    printf '%-18s %-8s rc=%-3s %4ss  %s\n' "$1" "$2" "$3" "$4" "${5:-}" | tee -a "$SUMMARY" "${STAGE_LOG:-$LOG}"
}

skip() { record "$1" SKIPPED - 0 "$2"; }

# stage NAME COMMAND...: run under the stage's limit (SIGINT first, so pytest still prints where it was and
# writes its JSON; SIGKILL KILL_AFTER seconds later), output to the log, result line to the summary.
stage() {
    local name=$1 limit
    shift
    limit=$(($(limit_of "$name") * LIMIT_SCALE))
    printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"${STAGE_LOG:-$LOG}"
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" >>"${STAGE_LOG:-$LOG}" 2>&1
    local rc=$?
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status=FAILED; fi
    [ "$status" = ok ] || FAILED=1
    record "$name" "$status" "$rc" "$((SECONDS - start))" "${STAGE_NOTE:-}"
    STAGE_NOTE=
    [ "$status" = ok ]
}

stage env bash "$REPO/bench/gpu_check.sh" --env "$FACTS"
HAS_CUDA= TORCH_CUDA_MAJOR= NVCC_MAJOR=
# shellcheck disable=SC1090
. "$FACTS"
rm -f "$FACTS" "$FACTS.py"
if [ -z "$HAS_CUDA" ]; then  # the env stage died before torch answered: ask the driver instead
    HAS_CUDA=0
    nvidia-smi -L >/dev/null 2>&1 && HAS_CUDA=1
fi
echo "CUDA=$HAS_CUDA torch CUDA major=${TORCH_CUDA_MAJOR:-none} nvcc major=${NVCC_MAJOR:-none}" | tee -a "$LOG"

if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    # --no-deps: nothing can be resolved from an index there; --target: the image's own packages stay untouched
    rm -rf "$SITE"
    stage wheels "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "$WHEEL_DIR"/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"
else
    skip wheels "no $WHEEL_DIR/*.whl (bench/WHEELS.md lists what to carry)"
fi

build() { stage "$1" env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${@:2}" "$PYTHON" setup.py -q build_ext --inplace; }
build_lane() {  # in the background, beside the probe; its log goes to its own file until it ends
    STAGE_LOG=$BUILD_LOG
    FAILED=0
    if [ "$QUICK" = 1 ] || [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
        skip install "quick rehearsal / GPU_CHECK_SKIP_INSTALL=1: the tree as it is"
        skip install_cpu "no build attempted"
    elif [ -z "$TORCH_CUDA_MAJOR" ] || [ -z "$NVCC_MAJOR" ] || [ "$TORCH_CUDA_MAJOR" != "$NVCC_MAJOR" ]; then
        skip install "CUDA build not tried: torch CUDA '${TORCH_CUDA_MAJOR:-none}' vs nvcc '${NVCC_MAJOR:-none}'"
        build install_cpu KARMA_NO_CUDA=1
    elif build install; then
        skip install_cpu "the CUDA build succeeded"
    else
        build install_cpu KARMA_NO_CUDA=1
    fi
    return "$FAILED"
}
BUILD_LOG=$(mktemp "${TMPDIR:-/tmp}/karma_gpu_check_build.XXXXXX")
build_lane &
BUILD_PID=$!

PROBE_BUDGET=$(($(limit_of probe) * LIMIT_SCALE - 8))  # the probe stops starting sections in time to exit on its own
[ "$QUICK" = 1 ] && PROBE_BUDGET=$((PROBE_BUDGET < 40 ? PROBE_BUDGET : 40))
stage probe "$PYTHON" -m bench.gpu_probe --out "$OUT_DIR/probe.jsonl" --budget "$PROBE_BUDGET" --skip topk_merge
# the model layer end to end on the device (bf16 autocast, fused ops, ShardedIndex's cuda path when faiss has
# GPU support), one short run of the same `karma train` users run; its metrics go to the log
if [ "$HAS_CUDA" = 1 ]; then
    stage karma_train "$PYTHON" -m karma train --preset tiny --out "${TMPDIR:-/tmp}/karma_gpu_check_train" --quiet --set train.device=cuda
else
    skip karma_train "no CUDA device: the model layer's GPU run is not rehearsed on CPU (CI trains it on CPU)"
fi
wait "$BUILD_PID" || FAILED=1
cat "$BUILD_LOG" >>"$LOG"
rm -f "$BUILD_LOG"
stage probe_topk "$PYTHON" -m bench.gpu_probe --out "$OUT_DIR/probe.jsonl" --budget 8 --only topk_merge

if [ "$HAS_CUDA" = 1 ]; then
    stage tests "$PYTHON" -m pytest "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_SELECT" -q -rs --maxfail=10 \
        -p no:cacheprovider
else  # the selection is still checked: it must name tests that exist
    STAGE_NOTE="no CUDA device: the GPU selection was collected, not run"
    stage tests "$PYTHON" -m pytest "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_SELECT" -q --collect-only \
        -p no:cacheprovider
fi

# One pytest run per bench file, each with its own JSON; a file cut at its limit keeps the cases it finished.
mkdir -p "$PARTS"
export KARMA_BENCH_GPU_ONLY=1 KARMA_BENCH_ROUNDS=3 KARMA_BENCH_REP=10
[ "$QUICK" = 1 ] && export KARMA_BENCH_QUICK=1 KARMA_BENCH_ROUNDS=2 KARMA_BENCH_REP=3
for name in bench_contrastive bench_linear_ce bench_topk_merge; do
    stage "$name" "$PYTHON" -m pytest "bench/$name.py" --benchmark-only -q -rs -p no:cacheprovider \
        --benchmark-json="$PARTS/$name.json" --benchmark-columns=min,median,max,rounds
done

REPORT_ARGS=(--out "$OUT_DIR" --probe "$OUT_DIR/probe.jsonl")
if compgen -G "$PARTS/*.json" >/dev/null; then
    stage report "$PYTHON" -m bench.report "$PARTS"/*.json "${REPORT_ARGS[@]}" --merged-json "$OUT_DIR/bench.json" \
        && rm -rf "$PARTS"  # merged into bench.json: keep the folder at 8 files
else
    stage report "$PYTHON" -m bench.report "${REPORT_ARGS[@]}"
fi

echo
echo "gpu_check: results in $OUT_DIR ($(ls "$OUT_DIR" | wc -l) entries)"
cat "$SUMMARY"
# the probe's tables (the top of the report) last, so a caller that keeps only the output's tail sees them
[ -f "$OUT_DIR/report.md" ] && sed -n '/^## GPU probe/,/^### /p' "$OUT_DIR/report.md" \
    | head -90
exit "$FAILED"
