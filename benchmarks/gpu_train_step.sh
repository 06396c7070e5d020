#!/usr/bin/env bash
# The GPU measurements in docs/benchmarks.md: ViT-S/16 and ResNet-50 Barlow Twins steps at 224 px, bf16,
# ours vs a bare PyTorch loop, plus peak memory and the data path. Usage: bash benchmarks/gpu_train_step.sh OUTDIR
set -u
out=${1:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
vit="--backbone.name vit_small_patch16_224 --backbone.depth 0 --backbone.embed_dim 0 --backbone.num_heads 0 --backbone.patch_size 0"
common="--config config/quickstart.yaml --data.img_size 224 --data.synthetic_size 256 --data.synthetic_train 512 --data.num_workers 8 --data.root /tmp/bench_data --steps 20 --warmup 5 --rounds 2"
filter='^(device|round|ours|bare|ratio|data path)'
for b in 64 256; do  # 64: the report's batch; 256: compute-bound
  python3 benchmarks/bench_train_step.py $common $vit --batch-size $b --data-batches $([ $b = 64 ] && echo 20 || echo 0) 2>&1 | grep -E "$filter|Error|error" | tee "$out/vit_s16_b$b.txt"
done
python3 benchmarks/bench_train_step.py $common --backbone.name resnet50 --backbone.depth 0 --backbone.embed_dim 0 --backbone.num_heads 0 --backbone.patch_size 0 --batch-size 64 --data-batches 0 2>&1 | grep -E "$filter|Error|error" | tee "$out/resnet50_b64.txt"
