#!/usr/bin/env bash
# Reference-length SVD training of CIFAR-10 ResNet-20 (and ResNet-56) on one CUDA GPU.
#   benchmarks/gpu_full.sh DATA_DIR [OUT_DIR] [key=value ...]   # needs cifar-10-batches-py/ in DATA_DIR;
#                                                 overrides go to both runs (e.g. epochs.train=30 to fit a time slot)
#   benchmarks/gpu_full.sh --smoke               # the same commands on CPU, tiny data, < 1 min
#   benchmarks/gpu_full.sh compress DATA_DIR [OUT_DIR] [compare.py options]
#                                                 # compress a trained model, every method, 3 seeds at 33%,
#                                                 # each method's settings as chosen on validation on the CPU budget
#   benchmarks/gpu_full.sh scratch DATA_DIR [OUT_DIR] [compare.py options]
#                                                 # from scratch, every method, 3 levels x 3 seeds
# Resumable: rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [ "${1:-}" = "--smoke" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PY -c "from svdtrain.data import write_fake_cifar; write_fake_cifar('$tmp/data', n_train=256, n_test=128)"
  for cfg in cifar10_resnet20_full cifar10_resnet56; do
    $PY -m svdtrain run "configs/$cfg.yaml" --out "$tmp/$cfg" --quiet data_dir="$tmp/data" device=cpu \
      epochs.orth=0 epochs.train=1 epochs.finetune=1 batch_size=64 threads=2 optim.lr=0.02 eval_batch_size=128
  done
  echo "smoke ok"
  exit 0
fi

if [ "${1:-}" = "compress" ] || [ "${1:-}" = "scratch" ]; then
  mode=$1
  data=${2:?usage: gpu_full.sh compress|scratch DATA_DIR [OUT_DIR] [options]}
  out=${3:-runs/gpu_$mode}
  shift 3 || shift $#
  mkdir -p "$out"
  nvidia-smi --query-gpu=name --format=csv,noheader > "$out/device.txt" || true
  if [ "$mode" = compress ]; then
    $PY benchmarks/compare.py --regime pretrained --device cuda --data-dir "$data" --work "$out/work" --out "$out" \
      --dense-epochs 40 --compress-epochs 8 --finetune-epochs 4 --levels 33% --seeds 0 1 2 \
      --method-lr svd_training=0.05 filter_pruning_l1=0.05 --method-rank-score posthoc_svd=loss "$@"
  else
    $PY benchmarks/compare.py --regime scratch --device cuda --data-dir "$data" --work "$out/work" --out "$out" \
      --levels 50% 33% 25% --seeds 0 1 2 "$@"
  fi
  exit 0
fi

data=${1:?usage: gpu_full.sh DATA_DIR [OUT_DIR] | compress|scratch DATA_DIR [OUT_DIR] | --smoke}
out=${2:-runs/gpu_full}
shift; shift || true
mkdir -p "$out"
$PY -m svdtrain run configs/cifar10_resnet20_full.yaml --out "$out/resnet20" data_dir="$data" device=cuda "$@"
$PY -m svdtrain run configs/cifar10_resnet56.yaml --out "$out/resnet56" data_dir="$data" device=cuda \
  epochs.orth=20 epochs.train=164 epochs.finetune=60 optim.schedule=cosine optim.lr=0.1 "$@"
nvidia-smi --query-gpu=name --format=csv,noheader > "$out/device.txt" || true
