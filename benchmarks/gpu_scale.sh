#!/usr/bin/env bash
# The scale measurements of docs/benchmarks.md on a lent GPU: ViT-S/16 at 224 px, bf16 — throughput, model
# FLOPs utilisation and peak memory vs batch with and without micro-batching, the largest batch within
# 16 GiB and within 78 GiB, our step vs a bare loop, and the data path (CPU vs GPU augmentation).
# Usage: bash benchmarks/gpu_scale.sh OUTDIR [PEAK_TFLOPS]   (PEAK_TFLOPS: 989 for H100 SXM / H200 bf16)
set -u
out=${1:-bench_out}; peak=${2:-989}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
vit="--backbone.name vit_small_patch16_224 --backbone.depth 0 --backbone.embed_dim 0 --backbone.num_heads 0 --backbone.patch_size 0 --data.img_size 224 --barlow.proj_dim 8192"
python3 benchmarks/bench_micro_batch.py --config config/quickstart.yaml $vit --micro 64 --batches 256,1024 \
  --steps 5 --warmup 2 --peak-tflops "$peak" --budget-gib 16 --budget-limit 8192 2>&1 | grep -vE "^INFO|Warning" | tee "$out/micro_batch_16g.txt"
python3 benchmarks/bench_micro_batch.py --config config/quickstart.yaml $vit --micro 128 --batches 2048 \
  --steps 3 --warmup 1 --peak-tflops "$peak" --budget-gib 78 --budget-limit 16384 2>&1 | grep -vE "^INFO|Warning" | tee "$out/micro_batch_78g.txt"
data="--data.synthetic_size 256 --data.synthetic_train 512 --data.root /tmp/bench_data"
python3 benchmarks/bench_data.py --config config/quickstart.yaml $vit $data --workers 8 --batches 20 --steps 10 2>&1 \
  | grep -vE "^INFO|Warning" | tee "$out/data.txt"
