#!/usr/bin/env bash
# Every GPU check of the project in one run of under 10 minutes, for a lent GPU machine that has
# torch, torchvision, typer, rich, numpy, pillow, matplotlib and pytest but no registry:
#
#   1. machine facts;
#   2. ResNet-50 at 224 px from a JPEG folder to stored embeddings, model-only roofs side by side
#      (benchmarks/embed_throughput.py, --decode gpu,cpu);
#   3. coreset / BADGE selection at 1M on CUDA (benchmarks/selection_scale.py);
#   4. in parallel: the active-learning benchmark on full Fashion-MNIST (ResNet-18, GPU) and the test
#      suite (the GPU tests first, then everything else, on the CPUs).
#
# Usage, from the repository root, with the Fashion-MNIST IDX files (*.gz) in .fmnist/:
#   OUT=/some/folder bash benchmarks/gpu_checks.sh
# Results: every file in $OUT/gpu-checks.tgz (default OUT: ./gpu-out), the reports also as plain
# files beside it (embed.md, selection.md, tests.txt, al.log), and at the end on stdout.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/gpu-checks.XXXXXX)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# the tests and the benchmark call `alselect`: without an installed console script, run the tree
mkdir -p /tmp/alselect-bin
printf '#!/bin/sh\nexec python3 -m alselect "$@"\n' > /tmp/alselect-bin/alselect
chmod +x /tmp/alselect-bin/alselect
export PATH=/tmp/alselect-bin:$PATH
T0=$SECONDS
LIMIT=${LIMIT:-570}  # the whole script's seconds
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu JPEGS=32 SELECTION_N=20000 AL_EXTRA="..." for a dry run on a CPU

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log start/end to stderr
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s) at +$((SECONDS - T0))s" >&2
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "== $name: rc=$rc after $((SECONDS - start))s" >&2
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, torchvision, numpy, PIL; print(sys.version.split()[0], "torch", torch.__version__,
"torchvision", torchvision.__version__, "numpy", numpy.__version__, "Pillow", PIL.__version__,
torch.cuda.get_device_name())'
    echo "cpus $(nproc)"; grep -m1 "model name" /proc/cpuinfo; free -g | head -2
} > "$W/facts.txt" 2>&1

# 2. embedding throughput (exclusive use of the GPU and CPUs)
step embed 200 python3 benchmarks/embed_throughput.py --device "$DEVICE" --cases resnet50 \
    --jpegs "${JPEGS:-30000}" --batch-size 256 --model-images 8192 --repeats 2 \
    --decode "${DECODE:-gpu,cpu}" --decode-only 400 --no-naive --json "$W/embed.json" \
    > "$W/embed.md" 2> "$W/embed.log"

# 3. selection at scale on CUDA
step selection 75 python3 benchmarks/selection_scale.py --device "$DEVICE" \
    --n "${SELECTION_N:-1000000}" --cases "${SELECTION_CASES:-coreset,badge}" --json "$W/selection.json" \
    > "$W/selection.md" 2> "$W/selection.log"

# 4. the AL benchmark on the GPU while the tests use the CPUs
AL_LIMIT=$((LIMIT - (SECONDS - T0) - 40))
(
    step al-benchmark "$AL_LIMIT" python3 -m alselect benchmark .fmnist -o .fmnist/gpu-results --seeds 3 \
        --arch resnet18_cifar --initial 1000 --step 1000 --cycles 4 --epochs 12 --lr 0.1 \
        --batch-size 128 --device "$DEVICE" ${AL_STRATEGIES:--s random -s margin -s badge -s learning-loss} \
        ${AL_EXTRA:-}
    # a run cut short wrote no summary: one finished (strategy, seed) is enough to write it
    step al-summary 30 python3 -m alselect benchmark .fmnist -o .fmnist/gpu-results --seeds 1 \
        --arch resnet18_cifar --initial 1000 --step 1000 --cycles 4 --epochs 12 --lr 0.1 \
        --batch-size 128 --device "$DEVICE" -s random ${AL_EXTRA:-}
) > "$W/al.out" 2> "$W/al.log" &
AL=$!
(
    step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py \
        tests/test_diversity_gpu.py tests/test_device_decode.py::test_nvjpeg_decode_is_within_the_stated_tolerance
    SUITE_LIMIT=$((AL_LIMIT - 160)); [ "$SUITE_LIMIT" -lt 20 ] && SUITE_LIMIT=20
    step suite "$SUITE_LIMIT" python3 -m pytest -q -p no:cacheprovider -rfE -n "${TEST_WORKERS:-10}" \
        --timeout 150 ${SUITE_ARGS:-}
) > "$W/tests.txt" 2>&1
wait $AL
echo "done at +$((SECONDS - T0))s" >&2
# the benchmark's models (cache/) stay behind; its CSV, state, summary and plot come back
tar czf "$OUT/gpu-checks.tgz" --exclude=cache --exclude=lock -C / "${W#/}" -C "$PWD" .fmnist/gpu-results
cp "$W/embed.md" "$W/selection.md" "$W/tests.txt" "$W/al.log" "$OUT/"
for f in facts.txt embed.md selection.md al.log; do echo "--- $f"; cat "$W/$f"; done
echo "--- tests.txt (end)"; tail -n 40 "$W/tests.txt"
