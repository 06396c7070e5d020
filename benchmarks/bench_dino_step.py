"""DINO training step: our Lightning module vs a bare PyTorch loop on the same model and multi-crop batch.

Both sides train the same student (backbone + DINO head) against the same EMA teacher, on the same pre-made
multi-crop batches (2 global + dino.local_crops_number local crops, random tensors already on the device: data
loading is excluded), with the same work per step: the weight-decay, learning-rate and teacher-momentum
schedules, the teacher pass on the global crops, one student backbone pass per crop resolution and one head
pass, the DINO loss with centering and sharpening, the center update, backward, per-parameter gradient
clipping, the frozen last layer during the first epoch, AdamW, and the teacher's EMA. The bare loop is
written as the official facebookresearch/dino ``train_one_epoch`` is (schedules as precomputed arrays, the
loss as ``DINOLoss.forward``, ``utils.clip_gradients``, the EMA as a parameter loop). The two alternate in
rounds so that machine noise hits both alike; the median of the rounds is reported.

    python benchmarks/bench_dino_step.py --config config/proxy/pretrain_dino.yaml --batch-size 32 --steps 10 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_train_step import _Batches, _Timer, _peak_gib, _reset_peak  # noqa: E402
from config.loading import parse_config, to_dict  # noqa: E402
from lightningmodules.dino import local_crop_size  # noqa: E402
from lightningmodules.dino import DinoModule  # noqa: E402
from utils.quiet import silence_known_noise  # noqa: E402


def make_batches(cfg, count: int, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """``count`` multi-crop batches: [global, global, local × dino.local_crops_number] of (B, 3, S, S)."""
    b, size, local = cfg.data.batch_size, cfg.data.img_size, local_crop_size(cfg)
    sizes = [size, size] + [local] * cfg.dino.local_crops_number
    return [[torch.randn(b, 3, s, s, generator=generator) for s in sizes] for _ in range(count)]


def on_device(batches, device: torch.device) -> list[list[torch.Tensor]]:
    return [[c.to(device) for c in crops] for crops in batches]


def lightning_ms_per_step(cfg, batches, steps: int, warmup: int, precision: str, device: torch.device) -> float:
    module = DinoModule(to_dict(cfg))
    loader = _Batches([batches[i % len(batches)] for i in range(steps + warmup)])
    timer = _Timer(warmup)
    trainer = pl.Trainer(max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, precision=precision, callbacks=[timer],
                         accelerator="auto", devices=1)
    trainer.fit(module, train_dataloaders=loader)
    return 1000 * (timer.end - timer.start) / steps


# ------------------------------------------------------------------------------------- the bare loop
def cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0) -> np.ndarray:
    """The official ``utils.cosine_scheduler``."""
    warmup = np.linspace(start_warmup, base, warmup_epochs * niter) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def dino_loss_official(student_output, teacher_output, center, student_temp, teacher_temp, ncrops):
    """The official ``DINOLoss.forward`` (and its ``update_center``'s batch mean, returned)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def bare_ms_per_step(cfg, batches, steps: int, warmup: int, device: torch.device, bf16: bool) -> float:
    reference = DinoModule(to_dict(cfg))  # only for the same architecture and initial weights
    student_backbone, head = copy.deepcopy(reference.backbone).to(device), copy.deepcopy(reference.head).to(device)
    teacher_backbone = copy.deepcopy(reference.teacher_backbone).to(device)
    teacher_head = copy.deepcopy(reference.teacher_head).to(device)
    del reference
    d, o = cfg.dino, cfg.optim
    student_params = [*student_backbone.parameters(), *head.parameters()]
    teacher_params = [*teacher_backbone.parameters(), *teacher_head.parameters()]
    regularized = [p for p in student_params if p.requires_grad and p.ndim > 1]
    not_regularized = [p for p in student_params if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    total = steps + warmup
    lr = o.lr * (cfg.data.batch_size / 256 if o.lr_scaling == "linear" else 1)
    lr_schedule = cosine_scheduler(lr, lr * o.min_lr_ratio, 1, total, 0)
    wd_schedule = cosine_scheduler(o.weight_decay, d.weight_decay_end, 1, total)
    momentum_schedule = cosine_scheduler(d.momentum_teacher, 1, 1, total)
    center = torch.zeros(1, d.out_dim, device=device)
    ncrops = 2 + d.local_crops_number
    for it in range(total):
        if it == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        crops = batches[it % len(batches)]
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher_output = teacher_head(teacher_backbone(torch.cat(crops[:2])))
            features = [student_backbone(torch.cat(crops[:2]))]
            if ncrops > 2:
                features.append(student_backbone(torch.cat(crops[2:])))
            student_output = head(torch.cat(features))
            loss = dino_loss_official(student_output.float(), teacher_output.float(), center, d.student_temp,
                                      d.teacher_temp, ncrops)
        with torch.no_grad():  # the official update_center
            batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True) / len(teacher_output)
            center = center * d.center_momentum + batch_center * (1 - d.center_momentum)
        optimizer.zero_grad()
        loss.backward()
        for p in student_params:  # the official utils.clip_gradients
            if p.grad is not None and d.clip_grad > 0:
                param_norm = p.grad.data.norm(2)
                clip_coef = d.clip_grad / (param_norm + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)
        if 0 < d.freeze_last_layer_epochs:  # epoch 0: the official cancel_gradients_last_layer
            for p in head.last_layer.parameters():
                p.grad = None
        optimizer.step()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student_params, teacher_params):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if not math.isfinite(loss.item()):  # the official loop's per-step check
            raise RuntimeError("loss is not finite")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/proxy/pretrain_dino.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="override data.batch_size")
    args, overrides = parser.parse_known_args()
    cfg = parse_config(["--config", args.config, *overrides])
    if cfg.task != "dino":
        parser.error(f"--config must be a --task=dino config, got task {cfg.task!r}")
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    precision = "bf16-mixed" if bf16 else "32-true"
    batches = on_device(make_batches(cfg, 4, torch.Generator().manual_seed(0)), device)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    d = cfg.dino
    print(f"device: {name}; precision {precision}; backbone {cfg.backbone.name} depth={cfg.backbone.depth} "
          f"embed_dim={cfg.backbone.embed_dim} patch={cfg.backbone.patch_size}; batch {cfg.data.batch_size}; "
          f"crops 2x{cfg.data.img_size}px + {d.local_crops_number}x{local_crop_size(cfg)}px; head "
          f"{d.hidden_dim}/{d.bottleneck_dim}/{d.out_dim}")
    ours, bare = [], []
    for r in range(args.rounds):
        torch.manual_seed(r)
        _reset_peak()
        ours.append(lightning_ms_per_step(cfg, batches, args.steps, args.warmup, precision, device))
        ours_peak = _peak_gib()
        torch.manual_seed(r)
        _reset_peak()
        bare.append(bare_ms_per_step(cfg, batches, args.steps, args.warmup, device, bf16))
        bare_peak = _peak_gib()
        print(f"round {r}: ours {ours[-1]:.1f} ms/step (peak {ours_peak:.2f} GiB), "
              f"bare {bare[-1]:.1f} ms/step (peak {bare_peak:.2f} GiB)", flush=True)
    o, p = statistics.median(ours), statistics.median(bare)
    images = cfg.data.batch_size
    print(f"ours: {o:.1f} ms/step = {1000 * images / o:.1f} images/s")
    print(f"bare PyTorch loop: {p:.1f} ms/step = {1000 * images / p:.1f} images/s")
    print(f"ratio ours/bare (time per step): {o / p:.3f}")


if __name__ == "__main__":
    main()
