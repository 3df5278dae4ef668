#!/usr/bin/env bash
# Train-step throughput and MFU of AlexNet (227 px), VGG-11 and NiN (224 px) on one NVIDIA GPU, in
# bfloat16 and float32, through benchmarks/train_step.py (plain XLA lowering: 'auto' = XLA off the
# CPU). Most of its time is compilation. (bf16 numerics: tests/test_bf16.py.)
#
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh            # default: python3
#   BATCH=128 MODELS=alexnet,nin STEPS=20 bash benchmarks/gpu_check.sh
#
# Needs only jax with a CUDA plugin, flax, optax, absl-py and numpy in that Python (no network, no
# pip install): e.g. jax==0.10.2 + jax-cuda12-plugin[with-cuda]==0.10.2, or a newer jax[cuda13].
# The full comparison (vs PyTorch on the same GPU, profiles, end-to-end, accuracy) is benchmarks/gpu_campaign.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BATCH=${BATCH:-256}
MODELS=${MODELS:-alexnet,vgg11,nin}
STEPS=${STEPS:-10}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import jax, flax, optax
print(f"jax {jax.__version__} flax {flax.__version__} optax {optax.__version__}; backend "
      f"{jax.default_backend()}; devices {jax.devices()}")
if jax.default_backend() != "gpu":
  raise SystemExit("gpu_check.sh: jax sees no GPU (is a CUDA plugin installed?)")
EOF

for dtype in bfloat16 float32; do
  echo "== $dtype, batch $BATCH ($(date -u +%H:%M:%S))"
  "$PY" benchmarks/train_step.py --models="$MODELS" --batch="$BATCH" --dtype="$dtype" \
      --impls=auto --steps="$STEPS" --warmup=2 --torch=false
done
echo "== done ($(date -u +%H:%M:%S))"
