#!/usr/bin/env bash
# Every GPU check of issue 4 in one call on a lent CUDA machine, most wanted first, each under its
# own time limit and all within 570 s of the start (the device tool's limit is 600): one log and six
# result files under $OUT, within what the device tool brings back (8 files, 2 folders down).
#
# Here, once (the device image lacks pyzmq, lz4 and zstandard; .whl is git-ignored through
# .git/info/exclude):   bash bench/device_check.sh fetch
# Then, through the device tool, with carry [".whl"] and a timeout of about 600 s:
#                       bash bench/device_check.sh run
# or, for issue 26's speed goal on a machine of 16 cores (no GPU needed; the CI box has 2, which
# CurveZMQ's encryption fills): a lost node's restore from peers against local disk, 1 GiB a rank,
# without the remote tier (the S3 server's binary is 150 MB: too large to carry), and what one and
# four CURVE links carry:
#                       bash bench/device_check.sh recovery
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pyzmq lz4 zstandard
    ls .whl
    exit
fi
MODE=${1:-}
[ "$MODE" = run ] || [ "$MODE" = recovery ] || { echo "usage: $0 fetch|run|recovery" >&2; exit 2; }

OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export GPU_TRAINER_TRACE_AFTER_S=60  # a hung GPU trainer prints its threads' stacks and exits (tests/gpu)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit
# The three import packages as pyproject maps them (snapd/, client/ as snapd.client, kernels/ as
# snapd.kernels), made of links to this checkout; PYTHONSAFEPATH keeps ./snapd, which lacks the
# other two, off the front of sys.path, in the daemons and trainers the tests start too.
mkdir -p /tmp/site/snapd
for f in snapd/*; do ln -sfn "$PWD/$f" /tmp/site/snapd/; done
ln -sfn "$PWD/client" /tmp/site/snapd/client
ln -sfn "$PWD/kernels" /tmp/site/snapd/kernels
export PYTHONPATH=/tmp/site:$PWD PYTHONSAFEPATH=1
python3 -c "import snapd.client, snapd.kernels.segments, snapd.daemon" || exit
LOG=$OUT/log.txt
nvidia-smi -L | tee "$LOG"

DEADLINE=570   # seconds from the start: each step gets its own limit or what is left, the less
step() {  # step NAME SECONDS COMMAND...: one check, its whole output appended to $LOG, its end shown
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -le 5 ] && { echo "== $name: skipped, no time left" | tee -a "$LOG"; return; }
    echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/step.log" 2>&1
    local rc=$?
    cat "$OUT/step.log" >> "$LOG"
    echo "== $name: rc $rc in $((SECONDS - t0))s" | tee -a "$LOG"
    tail -n 25 "$OUT/step.log"
    rm -f "$OUT/step.log"
}

if [ "$MODE" = recovery ]; then
    nproc | tee -a "$LOG"
    step curve-link 120 python3 -m bench.curve_link --mib 512 --reps 3
    step recovery 420 python3 -m bench.recovery --no-remote --mib 1024 --reps 3 --dir /tmp --out "$OUT/r"
    ls -lR "$OUT"
    exit
fi

# 1. the segment kernel, committed against the one before the warp tiles (results in k/), and the tests
step kernels 90 python3 -m bench.gpu_bench --kernels-only --out "$OUT/k" \
    --compare-kernel bench/kernel_versions/segments-v1.cu
step gpu-tests 200 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/gpu --deselect tests/gpu/test_kernel_sanitizer.py
# the kernel under compute-sanitizer: bad accesses, shared-memory races between lanes, barrier misuse
step sanitizer 100 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_kernel_sanitizer.py
# 2. the CPU stall by tensor count on the CUDA IPC path (the 2 ms target), a trainer's real state (s/)
step stall 90 python3 -m bench.stall_scaling --device cuda --state module --counts 16,256,1024 --reps 9 \
    --out "$OUT/s"
# 3. the whole GPU path at 1 and 4 GiB, against torch.save and DCP async_save, restores onto the device too (f/)
step gpu-bench 200 python3 -m bench.gpu_bench --sizes 1,4 --out "$OUT/f"
ls -lR "$OUT"
