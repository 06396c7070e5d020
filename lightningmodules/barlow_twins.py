"""Barlow Twins self-supervised pretraining (Zbontar et al., 2021) of a ViT or ResNet backbone."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from callbacks.finite_loss import record_nonfinite
from config.hparams import Hparams
from config.loading import from_dict, to_dict
from datamodules.barlow_twins import BarlowTwinsDataModule
from lightningmodules.registry import TASKS, Task
from models.backbones import build_backbone
from models.dense import DenseBarlowTwins
from models.losses import barlow_twins_loss, cross_correlation_terms
from models.projector import Projector
from utils.optim import build_optimizer, effective_lr, parameter_groups, rescale_checkpoint_lrs
from utils.schedule import with_schedule


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


class BarlowTwinsModule(pl.LightningModule):
    """Backbone + projector trained so that the two views' embeddings cross-correlate to the identity.

    Logs ``{train,val}/loss``, ``/on_diag`` and ``/off_diag``; keeps the latest training cross-correlation
    matrix (``last_cross_correlation``) and the epoch-averaged validation one (``val_cross_correlation``)
    on the device for callbacks, without host syncs.
    """

    def __init__(self, config: dict):
        super().__init__()
        # A plain dict: checkpoints stay loadable with torch.load(weights_only=True). Not sent to the
        # loggers: the trainer logs the config itself, at the top level of the wandb run config.
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg: Hparams = from_dict(config)
        self.backbone = build_backbone(self.cfg.backbone, self.cfg.data.img_size)
        self.projector = Projector(self.backbone.num_features, self.cfg.barlow.proj_dim, self.cfg.barlow.proj_layers)
        b = self.cfg.barlow
        # Optional dense term between patch tokens of matching image regions (models/dense.py).
        self.dense: Optional[DenseBarlowTwins] = None
        if b.dense_weight > 0:
            self.dense = DenseBarlowTwins(self.backbone.num_features, b.dense_proj_dim, b.proj_layers,
                                          b.dense_points, b.lambd)
        self.last_dense_cross_correlation: Optional[Tensor] = None
        self.val_dense_cross_correlation: Optional[Tensor] = None
        # peak lr (× batch/256 with --optim.lr_scaling linear); read by configure_optimizers at call time (LR finder)
        self.lr = effective_lr(self.cfg)
        self.last_cross_correlation: Optional[Tensor] = None
        self.val_cross_correlation: Optional[Tensor] = None
        self._val_c_sum: Optional[Tensor] = None
        self._val_dense_c_sum: Optional[Tensor] = None
        self._val_batches = 0
        # Device-side record of the first step whose loss was not finite (-1: none); read by
        # callbacks.finite_loss.FiniteLossGuard every few steps instead of syncing every step.
        self.register_buffer("first_nonfinite_step", torch.tensor(-1, dtype=torch.long), persistent=False)

    @classmethod
    def from_hparams(cls, cfg: Hparams) -> "BarlowTwinsModule":
        return cls(to_dict(cfg))

    def backbone_features(self, x: Tensor) -> Tensor:
        """Backbone embeddings of a batch, in chunks of ``barlow.micro_batch_size`` images when set.

        While training, each chunk runs under non-reentrant activation checkpointing: the forward pass
        keeps only the chunk's input and output, the backward pass recomputes the chunk's activations
        (with the RNG state of the first pass, so dropout and stochastic depth draw the same masks) and
        back-propagates the projector's gradient through them, one chunk at a time. This is gradient
        caching: the projector and the loss see the whole batch with a graph, the backbone's activation
        memory is that of one chunk, and the gradients are the whole batch's.
        """
        encode = self.backbone.forward_with_patches if self.dense is not None else self.backbone
        chunk = self.cfg.barlow.micro_batch_size
        if chunk <= 0 or x.shape[0] <= chunk:
            return encode(x)
        if not torch.is_grad_enabled():
            return concat_outputs([encode(part) for part in x.split(chunk)])
        return concat_outputs([
            checkpoint(encode, part, use_reentrant=False, preserve_rng_state=True,
                       context_fn=lambda: (contextlib.nullcontext(), batchnorm_stats_frozen(self.backbone)))
            for part in x.split(chunk)
        ])

    def features(self, x1: Tensor, x2: Tensor):
        """Backbone embeddings of both views, on this device's images only. With the dense term on, each
        view's features are a pair (embedding (B, D), patch-token grid (B, D, h, w))."""
        if self.backbone.batch_coupled or self.cfg.barlow.micro_batch_size > 0:
            # BatchNorm: each view its own pass, as in the official code. Micro-batching: chunks of each
            # view directly (no concatenated copy of both views' images, which grows with the batch).
            return self.backbone_features(x1), self.backbone_features(x2)
        # one forward pass over both views is faster and, without BatchNorm, identical
        both = self.backbone_features(torch.cat([x1, x2]))
        if isinstance(both, tuple):
            (f1, f2), (p1, p2) = (t.chunk(2) for t in both)
            return (f1, p1), (f2, p2)
        return both.chunk(2)

    def embed(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Projector outputs of both views of this device's images (no cross-device gathering)."""
        f1, f2 = self.features(x1, x2)
        if self.dense is not None:
            f1, f2 = f1[0], f2[0]
        # The projector has BatchNorm: each view is normalised over its own batch, as in the official code.
        return self.projector(f1), self.projector(f2)

    def gather_global(self, features: Tensor) -> Tensor:
        """All devices' features concatenated in rank order, with gradients flowing back to each device.

        The projector and the loss then run on the global batch on every device (replicated, cheap next to
        the backbone), so its BatchNorm and the cross-correlation see the global batch — the loss equals the
        single-process loss on the concatenated batch. Backward: each device receives the sum over devices
        of the gradient w.r.t. its own features (world_size × its share, since every device computed the same
        loss), and DDP's gradient averaging divides by world_size: the backbone gradients are exactly the
        single-process ones. (The official code's non-differentiable all_reduce shrinks them by world_size.)
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return features
        return self.all_gather(features, sync_grads=True).flatten(0, 1)

    def shared_step(self, batch, stage: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Loss, global cross-correlation matrix and (dense term on) the dense one, both detached."""
        x1, x2, *geometry = batch
        f1, f2 = self.features(x1, x2)
        dense_c = None
        if self.dense is not None:
            if not geometry:
                raise ValueError("barlow.dense_weight > 0 needs batches (x1, x2, g1, g2) with crop geometry: "
                                 "build the datamodule with geometry=True")
            (f1, patches1), (f2, patches2) = f1, f2
            points = self.dense.point_features(patches1, patches2, *geometry)
            dense_loss, dense_c = self.dense.loss(*(self.gather_global(t) for t in points))
        z1, z2 = self.projector(self.gather_global(f1)), self.projector(self.gather_global(f2))
        batch_size = z1.shape[0]
        global_loss, c = barlow_twins_loss(z1, z2, self.cfg.barlow.lambd)
        self.log_terms(stage, "", global_loss, c, batch_size)
        loss = global_loss
        if dense_c is not None:
            self.log_terms(stage, "dense_", dense_loss, dense_c, batch_size)
            self.log(f"{stage}/global_loss", global_loss.detach(), on_step=stage == "train", on_epoch=True,
                     batch_size=batch_size)
            loss = global_loss + self.cfg.barlow.dense_weight * dense_loss
            dense_c = dense_c.detach()
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss, c.detach(), dense_c

    def log_terms(self, stage: str, prefix: str, loss: Tensor, c: Tensor, batch_size: int) -> None:
        """Diagonal and off-diagonal sums of one cross-correlation matrix, and its loss per dimension."""
        on_diag, off_diag = cross_correlation_terms(c.detach())
        self.log_dict(
            {f"{stage}/{prefix}on_diag": on_diag, f"{stage}/{prefix}off_diag": off_diag},
            on_step=stage == "train", on_epoch=True, batch_size=batch_size,
        )
        if prefix:
            self.log(f"{stage}/{prefix}loss", loss.detach(), on_step=stage == "train", on_epoch=True,
                     batch_size=batch_size)
        # The loss sums D diagonal and D² − D off-diagonal terms: per dimension it compares across proj_dim.
        self.log(f"{stage}/{prefix}loss_per_dim", loss.detach() / c.shape[0], on_step=False, on_epoch=True,
                 batch_size=batch_size)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, c, dense_c = self.shared_step(batch, "train")
        self.last_cross_correlation, self.last_dense_cross_correlation = c, dense_c
        record_nonfinite(self, loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_c_sum, self._val_dense_c_sum, self._val_batches = None, None, 0

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        loss, c, dense_c = self.shared_step(batch, "val")
        self._val_c_sum = c if self._val_c_sum is None else self._val_c_sum + c
        if dense_c is not None:
            self._val_dense_c_sum = dense_c if self._val_dense_c_sum is None else self._val_dense_c_sum + dense_c
        self._val_batches += 1
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_batches:
            self.val_cross_correlation = self._val_c_sum / self._val_batches
            if self._val_dense_c_sum is not None:
                self.val_dense_cross_correlation = self._val_dense_c_sum / self._val_batches

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rescale_checkpoint_lrs(checkpoint, [g["lr"] for g in parameter_groups(self, self.cfg.optim, self.lr)])

    def configure_optimizers(self):
        return with_schedule(self.trainer, build_optimizer(self, self.cfg.optim, self.lr), self.cfg.optim)


TASKS.register("barlow_twins")(
    Task(
        module=BarlowTwinsModule,
        datamodule=lambda cfg: BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed, geometry=cfg.barlow.dense_weight > 0,
                                                     shared_crop=cfg.barlow.shared_crop),
        monitor="val/loss",
        mode="min",
        metrics=tuple(
            [f"train/{m}_{when}" for m in ("loss", "on_diag", "off_diag") for when in ("step", "epoch")]
            + [f"val/{m}" for m in ("loss", "on_diag", "off_diag", "loss_per_dim")]
            + ["train/loss_per_dim"]
        ),
    )
)
