"""Learning-rate schedule: linear warmup, then cosine decay to a floor, evaluated per optimiser step."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio)
    )


def with_schedule(trainer, optimizer: torch.optim.Optimizer, cfg) -> dict:
    """Lightning's configure_optimizers return value: ``optimizer`` with warmup + cosine over the whole
    run (``cfg`` is an OptimConfig), stepped every optimiser step."""
    total_steps = int(trainer.estimated_stepping_batches)
    batches = trainer.num_training_batches
    steps_per_epoch = max(1, int(batches)) if batches != float("inf") else total_steps
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = warmup_cosine(optimizer, warmup_steps, total_steps, cfg.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
