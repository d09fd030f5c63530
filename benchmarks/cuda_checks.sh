#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one go (about 3 minutes on an H200): the CUDA tests, then the two
# kernel benchmarks at --quick size. Usage: bash benchmarks/cuda_checks.sh [OUT] (default docs/results):
# OUT receives cuda_checks.log and the benchmarks' JSON and Markdown. Steps have their own time limits, so a
# hang in one still leaves the others' results. Needs the project installed (pip install -e .); pytest-xdist,
# where present, spreads Triton's compilations over the cores.
set -u
cd "$(dirname "$0")/.."
out=${1:-docs/results}
mkdir -p "$out"
log="$out/cuda_checks.log"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log its output and exit status
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$log"
    local began=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} in $((SECONDS - began))s" | tee -a "$log"
}
step 30 machine nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
step 30 versions python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, \
triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
# every CUDA test: end to end (compress on the GPU, latent-cache generation, Inductor's output code, save/load)
# and both kernels against their references
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step 240 cuda-tests python3 -m pytest -q -p no:cacheprovider -p no:benchmark $workers -rfEs tests/test_cuda_end_to_end.py \
    tests/test_latent_attention_triton.py tests/test_aq_linear_triton.py tests/test_latent_kv.py \
    -k "cuda or inductor_output or output_code_calls"
step 90 aq-linear-kernel python3 -m benchmarks.aq_linear_kernel --quick --out "$out"
step 150 latent-attention-kernel python3 -m benchmarks.latent_attention_kernel --quick --out "$out"
