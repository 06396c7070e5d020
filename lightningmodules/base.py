"""What every task shares: :class:`TaskModule`, the base class of the task LightningModules.

A task module (a pretraining method or a downstream task) subclasses :class:`TaskModule` and keeps only its
own objective and its own diagnostics. The base class owns

* the configuration: ``self.cfg`` (an :class:`~config.hparams.Hparams` rebuilt from the plain dict stored in
  the checkpoint), ``self.lr`` (the peak learning rate, ``optim.lr_scaling`` applied), ``from_hparams``;
* the training-step metrics: ``self.train_metrics`` (:class:`utils.step_logging.StepMetrics`) and its hooks;
* the non-finite loss guard: :meth:`TaskModule.record_nonfinite` (read by ``callbacks.finite_loss``);
* the optimiser and its schedule (:meth:`TaskModule.param_groups`, ``configure_optimizers``) and the learning
  rates of a resumed checkpoint (``on_load_checkpoint``);
* the micro-batched, gradient-cached backbone forward (:meth:`TaskModule.micro_batched`), used by every
  pretraining method;
* **the interface the callbacks read** (and nothing else of a module): :meth:`TaskModule.named_backbones`,
  :attr:`TaskModule.evaluated_role` and the per-step diagnostics (:attr:`TaskModule.last_cross_correlation`,
  ...), each with a default, so that a new method gets every picture and probe its data allows without
  touching a callback. docs/extending.md walks through adding a method.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from config.hparams import Hparams
from config.loading import from_dict, to_dict
from lightningmodules.nonfinite import record_nonfinite
from utils.optim import effective_lr, optimizer_from_groups, parameter_groups, rescale_checkpoint_lrs
from utils.schedule import with_schedule
from utils.step_logging import StepMetrics, StepMetricsHooks


@contextlib.contextmanager
def batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with batch statistics but leave their running statistics alone.

    Used while checkpointing recomputes a chunk in the backward pass: the forward pass already updated
    the running statistics with this chunk, and a second update would count it twice.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) · running + 0 · batch statistic
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def concat_outputs(outputs: list):
    """Concatenate chunk outputs along the batch: tensors, or tuples of tensors."""
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


class TaskModule(StepMetricsHooks, pl.LightningModule):
    """Base class of every task module: constructed as ``Module(config_dict)`` (see the module docstring)."""

    # -------------------------------------------------------------- the interface callbacks read
    evaluated_role: str = ""
    """The key of :meth:`named_backbones` whose backbone evaluation probes read (emergence Jaccard, online
    probe, receptive fields): ``""`` for a module with one backbone; DINO: ``"teacher"``."""

    last_cross_correlation: Optional[Tensor] = None
    """(D, D) cross-correlation of the two views' embeddings at the latest training step, detached, on the
    device (a Barlow Twins-style objective sets it; ``callbacks.cross_correlation`` logs and draws it)."""
    val_cross_correlation: Optional[Tensor] = None
    """The epoch mean of the validation steps' cross-correlation matrices (same shape), or None."""
    last_dense_cross_correlation: Optional[Tensor] = None
    """The dense (patch-level) term's cross-correlation at the latest training step, or None."""
    val_dense_cross_correlation: Optional[Tensor] = None
    """The dense term's epoch-mean validation cross-correlation, or None."""
    last_teacher_entropy: Optional[Tensor] = None
    """Mean entropy of a teacher's output distribution at the latest training step (a distillation method
    sets it; ``callbacks.dino_entropy`` plots it), a 0-d device tensor, or None."""
    last_teacher_mean_entropy: Optional[Tensor] = None
    """Entropy of the batch-mean teacher output at the latest training step, or None."""
    output_dim: Optional[int] = None
    """K, the width of the distribution :attr:`last_teacher_entropy` is over (its maximum is log K), or None."""

    def named_backbones(self) -> dict[str, nn.Module]:
        """Every backbone the module trains, by role: pictures drawn per backbone (attention maps) draw one per
        entry, and :attr:`evaluated_role` picks the one probes read. Default: ``{"": self.backbone}``."""
        return {"": self.backbone}

    def embed(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """The embeddings (B, D) of two views of the same images that a cross-correlation diagnostic compares
        (the pictures' "before training" matrix). A two-view method overrides it; others raise."""
        raise NotImplementedError(f"{type(self).__name__} has no two-view embedding")

    # -------------------------------------------------------------------------------- set-up
    def __init__(self, config: dict):
        super().__init__()
        # A plain dict: checkpoints stay loadable with torch.load(weights_only=True). Not sent to the
        # loggers: the trainer logs the config itself, at the top level of the wandb run config.
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg: Hparams = from_dict(config)
        # peak lr (× batch/256 with --optim.lr_scaling linear); read by configure_optimizers at call time (LR finder)
        self.lr = effective_lr(self.cfg)
        # Training scalars: Lightning's log on logging steps only, epoch means on the device (utils/step_logging.py).
        self.train_metrics = StepMetrics()
        # Device-side record of the first step whose loss was not finite (-1: none); read by
        # callbacks.finite_loss.FiniteLossGuard every few steps instead of syncing every step.
        self.register_buffer("first_nonfinite_step", torch.tensor(-1, dtype=torch.long), persistent=False)

    @classmethod
    def from_hparams(cls, cfg: Hparams):
        return cls(to_dict(cfg))

    def record_nonfinite(self, loss: Tensor) -> None:
        """Call with each training step's loss: remembers the first non-finite one without a host sync."""
        record_nonfinite(self, loss)

    # ------------------------------------------------------------------------------- forward
    @property
    def micro_batch_size(self) -> int:
        """Images per chunk of :meth:`micro_batched` (0 = the whole batch at once); a method reads its own flag."""
        return 0

    def micro_batched(self, encode: Callable, x: Tensor, stats_module: Optional[nn.Module] = None):
        """``encode(x)`` (a tensor, or a tuple of tensors), in chunks of :attr:`micro_batch_size` images.

        While training, each chunk runs under non-reentrant activation checkpointing: the forward pass
        keeps only the chunk's input and output, the backward pass recomputes the chunk's activations
        (with the RNG state of the first pass, so dropout and stochastic depth draw the same masks) and
        back-propagates the downstream gradient through them, one chunk at a time. This is gradient
        caching: the projector/head and the loss see the whole batch with a graph, the backbone's activation
        memory is that of one chunk, and the gradients are the whole batch's (exact for ViTs; BatchNorm
        normalises each chunk by its own statistics). ``stats_module`` (default ``self.backbone``): whose
        BatchNorm running statistics the recomputation must not update a second time.
        """
        chunk = self.micro_batch_size
        if chunk <= 0 or x.shape[0] <= chunk:
            return encode(x)
        if not torch.is_grad_enabled():
            return concat_outputs([encode(part) for part in x.split(chunk)])
        stats = stats_module if stats_module is not None else self.backbone
        return concat_outputs([
            checkpoint(encode, part, use_reentrant=False, preserve_rng_state=True,
                       context_fn=lambda: (contextlib.nullcontext(), batchnorm_stats_frozen(stats)))
            for part in x.split(chunk)
        ])

    def gather_global(self, features: Tensor) -> Tensor:
        """All devices' features concatenated in rank order, with gradients flowing back to each device.

        For an objective computed over the global batch (batch statistics, cross-correlation, covariance):
        every device computes the same loss on the global batch. Backward: each device receives the sum over
        devices of the gradient w.r.t. its own features (world_size × its share, since every device computed
        the same loss), and DDP's gradient averaging divides by world_size: the backbone gradients are exactly
        the single-process ones on the concatenated batch. One process: ``features`` unchanged.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return features
        return self.all_gather(features, sync_grads=True).flatten(0, 1)

    # ------------------------------------------------------------------------------ optimiser
    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups (default: every trainable parameter, ``optim`` decay rules)."""
        return parameter_groups(self, self.cfg.optim, self.lr)

    def configure_optimizers(self):
        """``optim.name`` over :meth:`param_groups`, warmup then cosine stepped every optimiser step."""
        return with_schedule(self.trainer, optimizer_from_groups(self.param_groups(), self.cfg.optim, self.lr),
                             self.cfg.optim)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        rescale_checkpoint_lrs(checkpoint, [g["lr"] for g in self.param_groups()])
