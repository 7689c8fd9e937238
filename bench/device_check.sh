#!/usr/bin/env bash
# Every GPU check of issues 4 and 5 in ONE device call (a session has 15 minutes of device time):
#   1. the fast kernels against eager on the GPU (pytest: FlexAttention, compiled decode step),
#   2. inference timings vs HF eager (bench/gpu_inference.py: prefill 2048/4096, decode b1/b16, 8k prefill memory),
#   3. training step tok/s, MFU, peak memory at 1x2048 and 2x4096 (bench/train_gpu.py).
# Each stage writes its JSON/log under $OUT as it finishes, so a timeout keeps what was measured.
# Run from the repo root through the device tool:  bash bench/device_check.sh   (timeout_s 540)
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gemmaforge-device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_fast.py 2>&1 | tee "$OUT/kernels.log"
timeout 240 python3 bench/gpu_inference.py --out "$OUT/gpu_inference.json" 2>&1 | tee "$OUT/inference.log"
timeout 150 python3 bench/train_gpu.py --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train.log"
