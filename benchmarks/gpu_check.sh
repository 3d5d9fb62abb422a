#!/usr/bin/env bash
# GPU checks (paper-protocol step time and memory, AMP, channels-last, the CUDA DDP
# path). Written to run on a lent GPU machine with the device tool, from the repository root:
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# The machine has no internet and no ../shared/data, so the network is timed on the synthetic
# dataset at the paper protocol's crop (320) and batch (4 + 4): DeepLabV3+ ResNet-101, random init.
# Results go to $OUT (the device tool brings them back); nothing here runs in CI or the tests.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
SYN=(--set data.crop_size=320 --set data.synthetic.size=400 --set train.device=cuda)
# 1. Step time and peak memory, alternating variants (benchmarks/step_cost.py), ≈ 3 min.
$PY benchmarks/step_cost.py --protocol paper --dataset synthetic --threads 8 --rounds 10 --warmup 3 \
  "${SYN[@]}" --out "$OUT" --scratch /tmp/step_cost_gpu --methods \
  unimatch@train.amp=false unimatch@train.amp=true "unimatch@train.amp=true,train.channels_last=true" \
  unimatch_supmix_sufd@train.amp=false unimatch_supmix_sufd@train.amp=true \
  "unimatch_supmix_sufd@train.amp=true,train.channels_last=true" 2>&1 | tail -14
# 2. The CUDA DDP path end to end (torchrun, NCCL, SyncBatchNorm, SUFD's hand-averaged gradients):
#    every GPU the machine has, a short synthetic run of the paper method.
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
$PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m semiseg train \
  -c protocols/cpu_small -c datasets/synthetic -c methods/unimatch_supmix_sufd --run-dir "$OUT/ddp_run" \
  --set train.iters=30 --set train.amp=true --set train.device=cuda --set train.progress=log 2>&1 | tail -12
