#!/usr/bin/env bash
# The one prepared GPU check (well under 5 minutes on an H100): one training epoch over 5,216 images (the size of
# the Kermany train split) of resnet50 and tf_efficientnet_lite0 with AMP (bf16 and fp16 + GradScaler) and
# channels_last, the cached-uint8 pipeline with the batched augmentation on the GPU. Prints img/s per setup.
#
#   bash benchmarks/gpu_smoke.sh                       # random pixels of the dataset's shape (speed only)
#   DATA=path/to/chest_xray bash benchmarks/gpu_smoke.sh
#   PYTHON=.venv/bin/python DEVICE=cpu IMAGES=64 PRECISIONS=bf16 BATCH=16 bash benchmarks/gpu_smoke.sh   # dry run on CPU
#
# On the device machine, missing wheels (none are needed for this script) can travel in .whl/ (device README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
DEVICE="${DEVICE:-cuda}"
if [ -n "${DATA:-}" ]; then source_args=(--data "$DATA"); else source_args=(--synthetic "${IMAGES:-5216}"); fi
"$PYTHON" benchmarks/train_speed.py "${source_args[@]}" --device "$DEVICE" --models resnet50 tf_efficientnet_lite0 \
  --precisions ${PRECISIONS:-bf16 fp16} --batch-size "${BATCH:-128}" --epoch
