#!/usr/bin/env bash
# Every GPU figure of bench/train_bench.py in one call of at most 8 minutes on one GPU: the real `jaxtune train`
# and transformers Trainer (+ PEFT) on the same generated Alpaca data and shapes, one JSON line per side and entry.
#   bench/gpu_suite.sh              # 1b full, 1b lora, 8b lora, 8b-qlora (each side under its own timeout)
#   bench/gpu_suite.sh --cpu-smoke  # the tiny preset only, 3 steps, on the CPU (orientation, never timed)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"

# Peak memory means something only if the allocators grow on demand: no XLA preallocation (BFC still tracks
# peak_bytes_in_use; the fraction caps what it may take), and torch's expandable segments (no fragmentation
# slack counted as peak).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TOKENIZERS_PARALLELISM=false

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
    exec "$py" "$here/train_bench.py" --preset tiny --method full --steps "${STEPS:-3}" --skip 1 --side both \
        --timeout 300
fi

# entry: preset method steps timeout-per-side (s); 2 * (50 + 50 + 65 + 65) = 460 s, inside 8 minutes
entries=(
    "1b full 8 50"
    "1b lora 8 50"
    "8b lora 6 65"
    "8b-qlora qlora 6 65"
)
for entry in "${entries[@]}"; do
    read -r preset method steps limit <<<"$entry"
    "$py" "$here/train_bench.py" --preset "$preset" --method "$method" --steps "$steps" --skip 2 --side both \
        --timeout "$limit" || echo "{\"preset\": \"$preset\", \"method\": \"$method\", \"skipped\": \"train_bench exited $?\"}"
done
