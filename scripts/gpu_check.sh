#!/usr/bin/env bash
# The GPU check of the scale work (issue 6), prepared to run in one call of a few minutes on a GPU machine.
#
#   1. here, on the CPU machine, once:   bash scripts/gpu_check.sh --prepare
#      downloads the few wheels the GPU image lacks (transformers 5.24 and the regex it requires: ~13 MB)
#      into .whl/ (git-ignored through .git/info/exclude). torch is NOT carried: the image's CUDA build
#      (2.11 when this was written) is used as it is; a multi-GB torch wheel cannot travel (64 MiB limit).
#   2. on the GPU machine, one call of the device tool, carrying .whl:
#        run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=590)
#      installs the wheels into /tmp/site, runs the tests marked `gpu` (bf16 / fp16 SDPA attribution on CUDA
#      against CPU fp32, memory linear in length, layers split between cuda and cpu), then the scale
#      benchmark in bf16 with SDPA: SmolLM2's architecture (random weights: the 538 MB converted checkpoint
#      cannot travel) at 512 / 2k / 8k tokens and LLaMA-3-8B's configuration at 2k / 8k / 32k, each with the
#      largest length that fits in GPU memory. Figures go to $OUT (the device tool brings them back):
#      gpu_env.txt, gpu_tests.log, scale_gpu_smollm2.json, scale_gpu_llama3_8b.json, gpu_check.log.
#   3. copy the figures into the README's scale section.
#
#   bash scripts/gpu_check.sh --smoke    runs the same steps on this CPU machine at toy sizes (plumbing test)
#
# Each step has its own time limit, so a slow step cannot eat the others' time; the JSON files are written
# after every measurement, so a step stopped at its limit still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
TRANSFORMERS_VERSION=5.24.0
REGEX_VERSION=2026.11.19

if [ "${1:-}" = "--prepare" ]; then
    set -e
    grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "transformers==$TRANSFORMERS_VERSION" "regex==$REGEX_VERSION"
    ls -la "$WHEELS"
    exit 0
fi

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/hf_pelrp_gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    export PYTHONPATH="$PWD/src"
    DEVICE=cpu
else
    PY=python3
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH="/tmp/site:$PWD/src"
    else
        echo "no wheels in $WHEELS (run --prepare on the CPU machine and carry $WHEELS); using the image's packages"
        export PYTHONPATH="$PWD/src"
    fi
    DEVICE=cuda
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
    $PY -c "import hf_pelrp; print('hf_pelrp', hf_pelrp.__version__, hf_pelrp.__file__)"
} | tee "$OUT/gpu_env.txt"

status=0
if [ "$SMOKE" = 1 ]; then
    # on a CPU the gpu-marked tests are collected and skipped: this checks that they import and select
    timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
        tests/test_precision.py tests/test_checkpointing.py tests/test_offload.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
    timeout 600 $PY scripts/bench_scale.py --device cpu --model smollm2-random --lengths 64 128 --threads 1 \
        --methods gxi pe_lrp_ckpt --search --max-length 512 --search-budget-gb 1.5 \
        --json "$OUT/scale_gpu_smollm2.json" || status=1
    exit $status
fi

# 1. the tests marked gpu, all files (modules needing packages absent from the image fail to collect and
#    are reported, the others run)
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests/ 2>&1 \
    | tee "$OUT/gpu_tests.log" || status=1

# 2. SmolLM2-135M's architecture, bf16, SDPA: 512 / 2k / 8k and the largest length (its maximum is 8192)
timeout 90 $PY scripts/bench_scale.py --device "$DEVICE" --dtype bfloat16 --model smollm2-random \
    --lengths 512 2048 8192 --search --json "$OUT/scale_gpu_smollm2.json" || status=1

# 3. LLaMA-3-8B's configuration, random bf16 weights: 2k / 8k / 32k, then the largest length that fits in
#    the GPU's memory, with and without gradient checkpointing (up to the model's 131072 positions)
timeout 300 $PY scripts/bench_scale.py --device "$DEVICE" --dtype bfloat16 --model llama3-8b \
    --lengths 2048 8192 32768 --search --step 1024 --json "$OUT/scale_gpu_llama3_8b.json" || status=1

echo "gpu_check finished with status $status"
exit $status
