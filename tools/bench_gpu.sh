#!/usr/bin/env bash
# The issues' GPU targets in one run (H100): train MFU, prefill ratio, decode ms/step, each against HF
# transformers on the same config in the same run. Usage: bash tools/bench_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt" || true
python tools/bench.py train --preset tinyllama-1.1b --seq 2048 --batch 8 --steps 10 --remat none 2>&1 | tee "$out/train.txt"
python tools/bench.py forward --preset tinyllama-1.1b --seq 2048 --batch 8 --repeats 2 --skip-rss 2>&1 | tee "$out/forward.txt"
for b in 1 64; do
  python tools/bench.py decode --preset llama2-7b --batch "$b" --prompt-len 128 --new 128 2>&1 | tee "$out/decode-b$b.txt"
done
