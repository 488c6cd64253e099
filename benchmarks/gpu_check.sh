#!/usr/bin/env bash
# The GPU check, for a CUDA machine (target: one NVIDIA H200), in under 8 minutes:
# the tests marked `gpu` on cuda, the training benchmark against its baseline on cuda
# (tokens/s, peak GPU memory, useful FLOP/s against the measured bf16 matmul peak) and
# the serving benchmark with the server on the GPU; one table at the end.
# Without a CUDA GPU it says so in one line and exits 0 (CI runs it that way).
#
#   benchmarks/gpu_check.sh            # after scripts/setup; TORCH_INDEX picks the CUDA wheels
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none): the CUDA checks are skipped."
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # The CPU build is installed: the same torch version, built for CUDA.
  version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PY" -m pip install -q --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" \
    "torch==${version}" || { echo "gpu_check: could not install a CUDA build of torch ${version}"; exit 1; }
fi
"$PY" -c "import bitsandbytes" 2>/dev/null || "$PY" -m pip install -q bitsandbytes \
  || echo "gpu_check: bitsandbytes could not be installed: the QLoRA checks will skip"
exec "$PY" benchmarks/gpu_check.py "$@"
