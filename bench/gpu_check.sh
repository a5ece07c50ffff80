#!/usr/bin/env bash
# The GPU path through the product on one card (bench/gpu_check.py says what it runs); about 4-6 min on an H200.
#   bench/gpu_check.sh [--work DIR] [--steps 40] [--layers 22] [--max-length 4096]
# Needs torch with CUDA, transformers, peft, bitsandbytes; flash-attn and liger-kernel when installed
# (pip install -e '.[gpu]'). Nothing is downloaded: the model is a random-init Llama built on the card.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)"
"$PYTHON" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn not installed: packed attention runs through sdpa with a block mask"
"$PYTHON" -c "import liger_kernel; print('liger-kernel installed')" 2>/dev/null || echo "liger-kernel not installed: the loss is our chunked cross-entropy"
exec "$PYTHON" bench/gpu_check.py "$@"
