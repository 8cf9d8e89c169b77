#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU (H100/H200), with no network, in under 8 minutes, the CUDA-marked
# tests and then every GPU figure the benchmarks define, each beside its goal (docs/benchmarks.md, "GPU check").
#
#   PYTHON=python3 benchmarks/gpu_check.sh OUT_DIR        # OUT_DIR defaults to $TMPDIR/gpu_check (or /tmp/...)
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh OUT_DIR   # the same stages on the CPU at tiny sizes (checks the script)
#
# Stages, each independent (one that fails, runs out of time or lacks a Python module is recorded and the next one
# runs): environment, gpu_tests, decoding, train_features, train_e2e, data, serving. OUT_DIR receives NAME.log for
# each stage, the benchmarks' JSON files, stages.tsv, and from benchmarks/gpu_report.py gpu_check.json (device,
# date, versions, every figure with its goal and whether it is met, every stage's status) and benchmarks_rows.md
# (rows for docs/benchmarks.md). A stage whose Python modules are missing is skipped, not failed.
# Exit status: 1 when a stage failed (or the report could not be written), else 0.
#
# Time: each stage has a limit (GPU_CHECK_LIMITS), and all of them draw on GPU_CHECK_BUDGET_S (default 450 s): a stage
# gets at most what is left, so the whole run, report included, ends within 8 minutes even when a stage hangs.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="${1:-${TMPDIR:-/tmp}/gpu_check}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$root" || exit 2
PYTHON="${PYTHON:-python3}"
dry="${GPU_CHECK_DRY_RUN:-0}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$dry" = 1 ]; then
    budget="${GPU_CHECK_BUDGET_S:-1200}"; device=cpu
else
    budget="${GPU_CHECK_BUDGET_S:-450}"; device=cuda
fi
stages="$out/stages.tsv"
: > "$stages"
names="environment gpu_tests decoding train_features train_e2e data serving"
for name in $names; do rm -f "$out/$name.log" "$out/$name.json"; done
rm -f "$out/gpu_tests.xml" "$out/gpu_check.json" "$out/benchmarks_rows.md"
started=$SECONDS
failed=0
no_device=""  # set when the environment stage finds no device: the stages after it are then skipped
note=""       # a remark recorded with the next stage (e.g. a test left out for a missing module)

command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_check: no Python at PYTHON=$PYTHON" >&2; exit 2; }
echo "== GPU check$([ "$dry" = 1 ] && echo ' (DRY RUN: CPU, tiny sizes)') into $out, budget ${budget} s, $(date -u +%FT%TZ)"

record() {  # NAME STATUS EXIT_CODE SECONDS DETAIL COMMAND
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" "${6//$'\t'/ }" >> "$stages"
}

missing_modules() {  # the Python modules among "$@" that $PYTHON cannot import
    "$PYTHON" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@" 2>/dev/null || echo "$@"
}

run_stage() {  # NAME LIMIT_S "MODULES" COMMAND...
    local name=$1 limit=$2 modules=$3
    shift 3
    local shown="python ${*:2}" log="$out/$name.log" missing left t0 rc secs status detail
    shown="${shown//"$out"/\$OUT}"
    if [ -n "$no_device" ]; then
        record "$name" skipped "" 0 "$no_device" "$shown"; echo "== $name: skipped ($no_device)"; note=""; return
    fi
    missing=$(missing_modules $modules)
    if [ -n "$missing" ]; then
        record "$name" skipped "" 0 "missing Python module(s): $missing" "$shown"
        echo "== $name: skipped (missing Python module(s): $missing)"; note=""; return
    fi
    left=$(( budget - (SECONDS - started) ))
    if [ "$left" -lt 15 ]; then
        record "$name" failed "" 0 "not run: the check's ${budget} s budget was spent by the stages before it" "$shown"
        echo "== $name: FAILED (not run: time budget spent)"; failed=$((failed + 1)); note=""; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s): $shown"
    t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
    rc=$?
    secs=$(( SECONDS - t0 ))
    case $rc in
        0) status=ok; detail="$note" ;;
        124|137) status=failed; detail="timed out after ${limit} s" ;;
        *) status=failed; detail="exit status $rc" ;;
    esac
    [ "$status" = failed ] && [ -n "$note" ] && detail="$detail; $note"
    record "$name" "$status" "$rc" "$secs" "$detail" "$shown"
    if [ "$status" = ok ]; then
        echo "   ok in ${secs} s$([ -n "$detail" ] && echo " ($detail)")"
    else
        failed=$((failed + 1))
        echo "   FAILED in ${secs} s ($detail); the end of $name.log:"
        tail -n 15 "$log" | sed 's/^/   | /'
    fi
    note=""
}

base="torch timm torchvision numpy PIL"  # what the model code imports (models/, utils/)
tests=(-m pytest -q -m gpu tests/test_gpu_paths.py -p no:cacheprovider --junitxml "$out/gpu_tests.xml")
if [ "$dry" = 1 ]; then
    # the same stages on the CPU: tiny backbone and sizes, one repeat, bf16 autocast kept, decoding compiled with
    # the cheap aot_eager backend (no code generation), training steps not compiled; one thread per process (on a
    # shared machine, OpenMP threads waiting for descheduled siblings cost 10x)
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    decoding=(benchmarks/bench_decoding.py --device cpu --batch 0 --e2e_batch 2 --img_size 64 --backbone swinv2_tiny
              --beam 2 --max_len 5 --precision bf16 --compile aot_eager --models optimizer_expansionnet --repeats 1)
    train_features=(benchmarks/bench_train_step.py --device cpu --amp bf16 --xe_batch 2 --scst_batch 2 --e2e_batch 0
                    --scst_max_len 3 --repeats 1 --warmup 0)
    train_e2e=(benchmarks/bench_train_step.py --device cpu --amp bf16 --xe_batch 0 --scst_batch 0 --e2e_batch 1
               --e2e_img_size 64 --backbone swinv2_tiny --repeats 1 --warmup 0)
    data=(benchmarks/bench_data.py --device cpu --gen_batch 2 --gen_batches 1 --img_size 64 --backbone swinv2_tiny
          --precision bf16 --reads 0)
    serving=(benchmarks/bench_serving.py --device cpu --precision bf16 --requests 4 --concurrency 2)
    read -r -a limits <<< "${GPU_CHECK_LIMITS:-240 240 240 240 240 240 240}"
else
    # the figures of the issue: batch 64 bf16 compiled captioning, XE 48 / SCST 24 x 5 on features, e2e XE 16
    decoding=(benchmarks/bench_decoding.py --device cuda --batch 0 --e2e_batch 64 --precision bf16 --compile
              --models optimizer_expansionnet --repeats 10)
    train_features=(benchmarks/bench_train_step.py --device cuda --amp bf16 --compile --xe_batch 48 --scst_batch 24
                    --e2e_batch 0 --repeats 10)
    train_e2e=(benchmarks/bench_train_step.py --device cuda --amp bf16 --xe_batch 0 --scst_batch 0 --e2e_batch 16
               --repeats 5)
    data=(benchmarks/bench_data.py --device cuda --gen_batch 64 --gen_batches 10 --precision bf16 --reads 0)
    serving=(benchmarks/bench_serving.py --device cuda --precision bf16 --requests 96 --concurrency 16)
    # seconds for each of $names in order (GPU_CHECK_LIMITS overrides them); all draw on the budget. Estimates until a first GPU run: compilation dominates them.
    read -r -a limits <<< "${GPU_CHECK_LIMITS:-45 120 120 150 45 30 50}"
fi

run_stage environment "${limits[0]}" "" "$PYTHON" benchmarks/gpu_report.py "$out" --environment "$device" \
    $([ "$dry" = 1 ] && echo --dry_run)
if [ "$(tail -n 1 "$stages" | cut -f2)" != ok ]; then
    no_device="no $device device or no torch (see environment.log)"
fi

api_modules="fastapi httpx python_multipart"
deselect=()
missing_api=$(missing_modules $api_modules)
if [ -n "$missing_api" ]; then  # the API test needs the server's modules; the other CUDA tests do not
    deselect=(--deselect tests/test_gpu_paths.py::test_gpu_api_backend_bf16)
    note="test_gpu_api_backend_bf16 left out: missing Python module(s) $missing_api"
fi
run_stage gpu_tests "${limits[1]}" "$base pytest h5py tqdm" "$PYTHON" "${tests[@]}" ${deselect[@]+"${deselect[@]}"}
run_stage decoding "${limits[2]}" "$base" "$PYTHON" "${decoding[@]}" --json "$out/decoding.json"
run_stage train_features "${limits[3]}" "$base" "$PYTHON" "${train_features[@]}" --json "$out/train_features.json"
run_stage train_e2e "${limits[4]}" "$base" "$PYTHON" "${train_e2e[@]}" --json "$out/train_e2e.json"
run_stage data "${limits[5]}" "$base h5py" "$PYTHON" "${data[@]}" --json "$out/data.json"
run_stage serving "${limits[6]}" "$base fastapi uvicorn httpx python_multipart" "$PYTHON" "${serving[@]}" \
    --json "$out/serving.json"

echo "== report ($(( SECONDS - started )) s so far)"
if ! "$PYTHON" benchmarks/gpu_report.py "$out"; then
    echo "gpu_check: the report could not be written" >&2
    failed=$((failed + 1))
fi
echo "== GPU check done in $(( SECONDS - started )) s: $failed failed; rows for docs/benchmarks.md in $out/benchmarks_rows.md"
[ "$failed" -eq 0 ]
