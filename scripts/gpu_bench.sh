#!/usr/bin/env bash
# The GPU benchmarks in one go (what the README's GPU figures come from):
#   bash scripts/gpu_bench.sh [OUT_DIR]
# 1. python -m infer.bench: every decoding mode at LLaDA-8B / Dream-7B shapes (random bf16 weights,
#    replayed testbed schedules), batch 1 and 8, attention backends inside the D2F loop, the cached
#    modes under CUDA graphs (infer.graphs; vanilla too, from 29 Nov 2026: about a minute more), and
#    transformers' generate on the same weights;
# 2. python -m d2f_kernels.bench_block_attention: the Triton kernel alone against SDPA and flex
#    (KERNEL=0 skips it).
# 3. COMPILE=1: the forward under torch.compile (infer.graphs.compiled), eager and inside the graphs, at
#    LLaDA-8B shape, batch 1, beside the same rows without it (compiling is untimed but takes minutes).
# Each step has its own time limit so one slow step cannot take the other's results with it.
# BENCH_ARGS / KERNEL_ARGS / COMPILE_ARGS pass extra options.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_bench}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-390}" "$PY" -m infer.bench --output-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "infer.bench exit ${PIPESTATUS[0]}"
if [ "${KERNEL:-1}" = 1 ]; then
    timeout "${KERNEL_TIMEOUT:-100}" "$PY" -m d2f_kernels.bench_block_attention --windows 32,64 --caches 512,2048 \
        --json "$OUT/kernel.json" ${KERNEL_ARGS:-} 2>&1 | tee "$OUT/kernel.log"
    echo "bench_block_attention exit ${PIPESTATUS[0]}"
fi
if [ "${COMPILE:-0}" = 1 ]; then
    timeout "${COMPILE_TIMEOUT:-240}" "$PY" -m infer.bench --output-dir "$OUT/compile" --compile --shapes llada-8b \
        --modes d2f,fast-dllm-dual-0.99,ar --batch-sizes 1 --backends sdpa --no-hf ${COMPILE_ARGS:-} 2>&1 | tee "$OUT/compile.log"
    echo "infer.bench --compile exit ${PIPESTATUS[0]}"
fi
