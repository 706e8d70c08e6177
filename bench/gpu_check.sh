#!/usr/bin/env bash
# The prepared GPU check, one call on a GPU machine (H200): builds for sm_90, runs the CUDA tests
# and the GPU benchmarks, writes logs/JSON under OUT_DIR and prints a short table last.
# Needs torch (CUDA), scikit-build-core, cmake, ninja, pytest, transformers already installed.
#
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export EXPERTFLOW_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PATH="${CUDA_HOME}/bin:$PATH" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

start=$(date +%s)
if ! "$py" -m pip install -v --no-build-isolation --no-deps --no-index . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

"$py" -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/pytest_cuda.log" | tail -5
"$py" -m pytest tests -q -p no:cacheprovider -x 2>&1 | tee "$out/pytest_all.log" | tail -3
for dtype in float32 bfloat16; do
  "$py" bench/bench_gating.py --device cuda --dtype "$dtype" --out "$out" \
    >"$out/bench_gating_$dtype.txt" 2>&1 || echo "bench_gating $dtype FAILED"
done

"$py" bench/bench_transfer.py --out "$out" >"$out/bench_transfer.txt" 2>&1 \
  || echo "bench_transfer FAILED"
"$py" bench/bench_dequant.py --device cuda --out "$out" >"$out/bench_dequant.txt" 2>&1 \
  || echo "bench_dequant FAILED"
"$py" bench/bench_cpu_experts_decode.py --device cuda --layers 8 \
  >"$out/bench_cpu_experts_decode.txt" 2>&1 || echo "bench_cpu_experts_decode FAILED"
"$py" bench/bench_offload.py --device cuda --layers 8 --hidden 1024 --intermediate 2816 \
  --out "$out" >"$out/bench_offload.txt" 2>&1 || echo "bench_offload FAILED"

"$py" -m expertflow demo --device cuda --max-new-tokens 64 >"$out/demo_cuda.txt" 2>&1 \
  || echo "demo on cuda FAILED"

"$py" bench/bench_generate_batch.py --device cuda --requests 256 --batch-sizes 16,64 \
  >"$out/bench_generate_batch_cuda.txt" 2>&1 || echo "bench_generate_batch on cuda FAILED"
"$py" bench/bench_prefill.py --device cuda >"$out/bench_prefill_cuda.txt" 2>&1 \
  || echo "bench_prefill on cuda FAILED"

echo "== summary =="
grep -E "passed|failed" "$out/pytest_cuda.log" | tail -1
for dtype in float32 bfloat16; do
  echo "-- gating on cuda, $dtype (T=4096 rows)"
  grep -E "router|4096|min speed-up|copy_bandwidth" "$out/bench_gating_$dtype.txt" | cut -c1-160
done
echo "-- dequantize an expert on cuda (kernel vs pinned H2D copy of the stored bytes)"
tail -11 "$out/bench_dequant.txt"
echo "-- transfer engine"
tail -12 "$out/bench_transfer.txt"
echo "-- offloaded decode"
grep -vE "^\[transformers\]" "$out/bench_offload.txt" | tail -9
echo "-- CPU experts: decode tokens/s, never / always / auto (hybrid)"
grep -vE "^\[transformers\]" "$out/bench_cpu_experts_decode.txt" | tail -11
echo "-- expertflow demo on cuda"
tail -10 "$out/demo_cuda.txt"
echo "-- batched generation on cuda (fifo vs scheduler)"
tail -9 "$out/bench_generate_batch_cuda.txt"
echo "-- mixed-length prefill on cuda (padded groups vs equal lengths only)"
tail -6 "$out/bench_prefill_cuda.txt"
