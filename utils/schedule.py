"""Learning-rate schedule: linear warmup, then cosine decay to a floor, evaluated per optimiser step.

The official Barlow Twins schedule (facebookresearch/barlowtwins ``adjust_learning_rate``), for step s
(0-based) of S with W warmup steps: lr · s / W while s < W, then
lr · (m + (1 − m) · ½ (1 + cos(π (s − W) / (S − W)))) with m = ``min_lr_ratio`` (official: 0.001). The
first step therefore runs at rate 0, as there.
"""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): ``step / warmup_steps`` during the warmup
    (0 at the first step), then the cosine from 1 down to ``min_ratio`` at ``total_steps`` (and after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio)
    )


def log_effective_lr(trainer, optimizer: torch.optim.Optimizer) -> None:
    """Log ``optim/effective_lr``, the peak rate of the first parameter group (``optim.lr``, scaled by
    ``optim.lr_scaling``; the weights' group), to every logger at the current step (rank zero).

    Not when fit() resumes a checkpoint: the run logged it when it started, and Lightning builds the optimizer
    before it restores the step counter (it would be a second row at step 0)."""
    if not trainer.is_global_zero or not optimizer.param_groups or getattr(trainer, "ckpt_path", None):
        return
    value = float(optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]))
    for logger in trainer.loggers:
        logger.log_metrics({"optim/effective_lr": value}, step=trainer.global_step)


def with_schedule(trainer, optimizer: torch.optim.Optimizer, cfg) -> dict:
    """Lightning's configure_optimizers return value: ``optimizer`` with warmup + cosine over the whole
    run (``cfg`` is an OptimConfig), stepped every optimiser step; logs the peak rate (:func:`log_effective_lr`)."""
    total_steps = int(trainer.estimated_stepping_batches)
    batches = trainer.num_training_batches
    steps_per_epoch = max(1, int(batches)) if batches != float("inf") else total_steps
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    log_effective_lr(trainer, optimizer)
    scheduler = warmup_cosine(optimizer, warmup_steps, total_steps, cfg.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
