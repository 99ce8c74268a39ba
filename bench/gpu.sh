#!/usr/bin/env bash
# One command for a GPU session:
#
#   bash bench/gpu.sh            # on a CUDA machine, from a checkout
#   GPU_SH_TINY=1 bash bench/gpu.sh   # (or --tiny) every step in its CPU tiny mode, results to a
#                                      # temporary folder: what tests/test_gpu_sh.py runs
#
# 1. installs what travels as wheels, if present (.whl/ or bench/wheels/: a package the GPU
#    image lacks, e.g. diffusers or flash-attn-4), into /tmp/gpu_sh_site, for this run only,
#    and this checkout itself (no dependencies) so vitok_fast.kernels imports;
# 2. runs, each under its own time cap (`timeout`) and all within GPU_SH_BUDGET seconds (default
#    540: 9 minutes of commands; tiny mode 1800, for a shared CPU), most valuable first, so a
#    short budget keeps what matters (a step that would start with under 20 s left is skipped
#    for time, and the summary says so):
#      python -m vitok_fast.selftest         -> selftest_<gpu>.json
#      bench/compile_paths.py                 -> compile_paths_<gpu>.json (compiled kernel path
#                                                vs compiled reference path, and eager)
#      pytest -m gpu                          (the CUDA-only tests: opcheck on CUDA, ...)
#      bench/bench_kernels.py                 -> kernels_<gpu>.json / .png (vs eager and compile)
#      bench/bench_e2e.py                     -> e2e_<gpu>.json / .png (vs SD-VAE; saves after every case)
#      bench/train_throughput.py --variants compile_kernels (the compiled model) -> train_<gpu>.json
#      then, while time is left: bench/roofline.py (a model, not a measurement), the other
#      training variants, bench/bench_attention.py, bench/profile_step.py -> profiles/
#    One failing step does not stop the others; its log is under <results>/gpu_logs/.
# 3. writes <results>/gpu_summary.md after every step (so a run cut short still has one): a
#    table of the steps (status, seconds, log or why skipped) and, where a GPU run's
#    measurements exist, the roofline's predictions beside them.
# The exit status is the number of failed steps (0: all passed), at most 100.
#
# Environment: GPU_SH_TINY=1, GPU_SH_BUDGET (seconds), GPU_SH_OUT (results folder; default
# bench/results, tiny: a new temporary folder), GPU_SH_ONLY (comma list of step names, e.g.
# selftest,bench_e2e: run only those), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

TINY=${GPU_SH_TINY:-0}
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        *) echo "error: unknown option $arg (expected --tiny; see the comments at the top of bench/gpu.sh)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
if [ "$TINY" = 1 ]; then BUDGET=${GPU_SH_BUDGET:-1800}; else BUDGET=${GPU_SH_BUDGET:-540}; fi
if [ "$TINY" = 1 ]; then
    OUT=${GPU_SH_OUT:-$(mktemp -d /tmp/gpu_sh.XXXXXX)}
else
    OUT=${GPU_SH_OUT:-bench/results}
fi
case "$BUDGET" in ''|*[!0-9]*) echo "error: GPU_SH_BUDGET must be whole seconds, given '$BUDGET'" >&2; exit 2 ;; esac
mkdir -p "$OUT/gpu_logs" || exit 2
STEPS="$OUT/gpu_logs/steps.tsv"
: > "$STEPS"

# -- 1. packages ------------------------------------------------------------------------------
for dir in .whl bench/wheels; do
    if compgen -G "$dir/*.whl" > /dev/null; then
        echo "== installing the wheels in $dir into /tmp/gpu_sh_site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu_sh_site "$dir"/*.whl \
            && export PYTHONPATH="/tmp/gpu_sh_site${PYTHONPATH:+:$PYTHONPATH}" \
            || echo "warning: installing $dir/*.whl failed; continuing without them" >&2
    fi
done
"$PY" -c "import os, sys, vitok_fast.kernels as k
sys.exit(0 if os.path.samefile(os.path.dirname(os.path.dirname(k.__file__)), '.') else 1)" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "warning: could not install this checkout; the steps may fail to import vitok_fast" >&2

GPU=$("$PY" -c "import re, torch
n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
print(re.sub(r'[^a-z0-9]+', '_', n.lower()).strip('_'))" 2>/dev/null || echo unknown)
echo "== device: $GPU; results in $OUT; budget ${BUDGET} s; tiny=$TINY"
START=$(date +%s)  # the budget counts the steps' time, from here

# -- 2. the steps -----------------------------------------------------------------------------
FAILED=0
# step NAME CAP_SECONDS COMMAND...: run it under `timeout`, log it, record its status
step() {
    local name=$1 cap=$2
    shift 2
    if [ -n "${GPU_SH_ONLY:-}" ] && [[ ",$GPU_SH_ONLY," != *",$name,"* ]]; then
        return
    fi
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\tskipped for time (budget spent)\n' "$name" >> "$STEPS"
        echo "== $name: skipped for time (budget spent)"
        summary
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (cap ${cap} s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$cap" "$@" > "$OUT/gpu_logs/$name.log" 2>&1
    local rc=$? secs=$(( $(date +%s) - t0 ))
    local status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"; elif [ $rc -ne 0 ]; then status="FAIL (exit $rc)"; fi
    [ "$status" = ok ] || FAILED=$((FAILED + 1))
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "gpu_logs/$name.log" >> "$STEPS"
    echo "   $status in ${secs} s; last lines:"
    tail -n 4 "$OUT/gpu_logs/$name.log" | sed 's/^/   | /'
    summary
}
summary() {  # the summary as it stands: rewritten after every step
    "$PY" bench/gpu_summary.py --results "$OUT" --gpu "$GPU" --budget "$BUDGET" \
        --elapsed $(( $(date +%s) - START )) > /dev/null 2>&1
}
skip() {  # skip NAME REASON
    [ -n "${GPU_SH_ONLY:-}" ] && [[ ",$GPU_SH_ONLY," != *",$1,"* ]] && return
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"
    echo "== $1: skipped ($2)"
}

if [ "$TINY" = 1 ]; then
    # our kernels on the CPU: Triton's interpreter, chosen before any Python starts
    python_has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    [ "$python_has_cuda" = 1 ] || export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
    step selftest 600 "$PY" -m vitok_fast.selftest --quick --out "$OUT/selftest_cpu.json"
    # the plumbing only: aot_eager (no Inductor build), the kernel path, one step
    step compile_paths 240 "$PY" bench/compile_paths.py --models T-T/8 --resolution 32 --reps 1 \
        --paths kernels --backend aot_eager --json "$OUT/compile_paths_cpu.json"
    # no CUDA-only test runs on a CPU: pytest exits 5 (nothing collected) or 0 (all skipped)
    step pytest_gpu 120 bash -c "'$PY' -m pytest tests/ -m gpu -q -p no:cacheprovider --benchmark-disable; rc=\$?; [ \$rc -eq 5 ] && exit 0; exit \$rc"
    step bench_kernels 120 "$PY" bench/bench_kernels.py --device cpu --ops rms_norm --out-dir "$OUT"
    step bench_e2e 180 "$PY" bench/bench_e2e.py --tiny --device cpu --write-cpu --out-dir "$OUT" \
        --models T-T/8 --no-video --batches 1 --stages encode+decode
    skip train_throughput "needs CUDA: the script has no CPU mode"
    step roofline 120 "$PY" bench/roofline.py --model S-B/16 --batch 2 --json "$OUT/roofline_S-B_16.json"
    step bench_attention 120 "$PY" bench/bench_attention.py --device cpu --out-dir "$OUT"
    step profile_step 180 "$PY" bench/profile_step.py --tiny --device cpu --out-dir "$OUT/profiles"
else
    step selftest 180 "$PY" -m vitok_fast.selftest --out "$OUT/selftest_$GPU.json"
    step compile_paths 150 "$PY" bench/compile_paths.py --device cuda --models S-B/16 --resolution 256 \
        --batch 16 --reps 10 --json "$OUT/compile_paths_$GPU.json"
    step pytest_gpu 150 "$PY" -m pytest tests/ -m gpu -q -p no:cacheprovider --benchmark-disable
    step bench_kernels 120 "$PY" bench/bench_kernels.py --out-dir "$OUT"
    step bench_e2e 180 "$PY" bench/bench_e2e.py --out-dir "$OUT"
    # one variant a run, so a cap that cuts one short keeps the others; merged in the summary
    step train_compile_kernels 150 "$PY" bench/train_throughput.py --variants compile_kernels \
        --out "$OUT/gpu_logs/train_compile_kernels.json"
    # the model's predictions: seconds, no GPU work
    step roofline 60 "$PY" bench/roofline.py --model S-B/16 --json "$OUT/roofline_S-B_16.json"
    for variant in eager_reference compile_reference eager_kernels; do
        step "train_$variant" 150 "$PY" bench/train_throughput.py --variants "$variant" \
            --out "$OUT/gpu_logs/train_$variant.json"
    done
    step bench_attention 150 "$PY" bench/bench_attention.py --out-dir "$OUT"
    step profile_step 150 "$PY" bench/profile_step.py --out-dir "$OUT/profiles"
fi

# -- 3. the summary ---------------------------------------------------------------------------
"$PY" bench/gpu_summary.py --results "$OUT" --gpu "$GPU" --budget "$BUDGET" \
    --elapsed $(( $(date +%s) - START )) || FAILED=$((FAILED + 1))
echo "== $FAILED step(s) failed; summary: $OUT/gpu_summary.md"
[ "$FAILED" -gt 100 ] && FAILED=100
exit "$FAILED"
