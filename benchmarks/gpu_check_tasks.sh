#!/usr/bin/env bash
# GPU checks of the tasks end to end (bf16): batch-size + LR tuning on CUDA, a segmentation epoch with
# each ViT head, DeepLabV3 with its aux head. Usage: bash benchmarks/gpu_check_tasks.sh OUTDIR
set -u
out=${1:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
vit="--backbone.name vit_small_patch16_224 --backbone.depth 0 --backbone.embed_dim 0 --backbone.num_heads 0 --backbone.patch_size 0"
rn="--backbone.name resnet50 --backbone.depth 0 --backbone.embed_dim 0 --backbone.num_heads 0 --backbone.patch_size 0"
data="--config config/quickstart.yaml --data.root /tmp/gpu_data --data.img_size 224 --data.synthetic_size 256 --data.synthetic_train 1024 --data.synthetic_val 256 --data.num_workers 12 --log.output_dir /tmp/gpu_runs --log.wandb_mode disabled --trainer.progress_bar false"
keep='tuner|LR finder|batch size|Epoch|error|Error|Traceback|stopped|run directory|epoch_s'
t() { local name=$1; shift; local s=$SECONDS; python3 main.py $data --log.run_name $name "$@" > "$out/$name.log" 2>&1; echo "$name rc=$? wall=$((SECONDS - s))s"; grep -E "$keep" "$out/$name.log" | tail -4; }
t tune $vit --trainer.tune_batch_size true --trainer.tune_batch_size_max 512 --trainer.tune_lr true --trainer.tune_lr_steps 30 --trainer.max_epochs 1 --data.batch_size 64
cat /tmp/gpu_runs/tune/tuning.yaml; cp /tmp/gpu_runs/tune/media/lr_finder.png "$out/" 2>/dev/null
for head in linear setr_naive setr_pup setr_mla; do
  t seg_$head $vit --task segmentation --segmentation.head $head --segmentation.hidden_dim 256 --data.batch_size 32 --trainer.max_epochs 2
done
t deeplab $rn --task segmentation --segmentation.head deeplabv3 --segmentation.aux_loss true --data.batch_size 16 --trainer.max_epochs 2
for r in /tmp/gpu_runs/seg_* /tmp/gpu_runs/deeplab; do python3 - "$r" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1] + "/metrics.csv")))
print(sys.argv[1].split("/")[-1], [(r["epoch"], round(float(r["val/mIoU"]), 4)) for r in rows if r.get("val/mIoU")])
PY
done
