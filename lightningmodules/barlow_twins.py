"""Barlow Twins self-supervised pretraining (Zbontar et al., 2021) of a ViT or ResNet backbone."""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.finite_loss import record_nonfinite
from config.hparams import Hparams
from config.loading import from_dict, to_dict
from datamodules.barlow_twins import BarlowTwinsDataModule
from lightningmodules.registry import TASKS, Task
from models.backbones import build_backbone
from models.losses import barlow_twins_loss, cross_correlation_terms
from models.projector import Projector
from utils.optim import build_optimizer, parameter_groups, rescale_checkpoint_lrs
from utils.schedule import with_schedule


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
        self.lr = self.cfg.optim.lr  # read by configure_optimizers at call time (LR finder)
        self.last_cross_correlation: Optional[Tensor] = None
        self.val_cross_correlation: Optional[Tensor] = None
        self._val_c_sum: Optional[Tensor] = None
        self._val_batches = 0
        # Device-side record of the first step whose loss was not finite (-1: none); read by
        # callbacks.finite_loss.FiniteLossGuard every few steps instead of syncing every step.
        self.register_buffer("first_nonfinite_step", torch.tensor(-1, dtype=torch.long), persistent=False)

    @classmethod
    def from_hparams(cls, cfg: Hparams) -> "BarlowTwinsModule":
        return cls(to_dict(cfg))

    def embed(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        if self.backbone.batch_coupled:
            f1, f2 = self.backbone(x1), self.backbone(x2)
        else:  # one forward pass over both views is faster and, without BatchNorm, identical
            f1, f2 = self.backbone(torch.cat([x1, x2])).chunk(2)
        # The projector has BatchNorm: each view is normalised over its own batch, as in the official code.
        return self.projector(f1), self.projector(f2)

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        x1, x2 = batch
        z1, z2 = self.embed(x1, x2)
        loss, c = barlow_twins_loss(z1, z2, self.cfg.barlow.lambd)
        on_diag, off_diag = cross_correlation_terms(c.detach())
        self.log_dict(
            {f"{stage}/on_diag": on_diag, f"{stage}/off_diag": off_diag},
            on_step=stage == "train", on_epoch=True, batch_size=x1.shape[0],
        )
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=x1.shape[0])
        # The loss sums D diagonal and D² − D off-diagonal terms: per dimension it compares across proj_dim.
        self.log(f"{stage}/loss_per_dim", loss.detach() / c.shape[0], on_step=False, on_epoch=True, batch_size=x1.shape[0])
        return loss, c.detach()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, c = self.shared_step(batch, "train")
        self.last_cross_correlation = c
        record_nonfinite(self, loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_c_sum, self._val_batches = None, 0

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        loss, c = self.shared_step(batch, "val")
        self._val_c_sum = c if self._val_c_sum is None else self._val_c_sum + c
        self._val_batches += 1
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_batches:
            self.val_cross_correlation = self._val_c_sum / self._val_batches

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rescale_checkpoint_lrs(checkpoint, [g["lr"] for g in parameter_groups(self, self.cfg.optim, self.lr)])

    def configure_optimizers(self):
        return with_schedule(self.trainer, build_optimizer(self, self.cfg.optim, self.lr), self.cfg.optim)


TASKS.register("barlow_twins")(
    Task(
        module=BarlowTwinsModule,
        datamodule=lambda cfg: BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed),
        monitor="val/loss",
        mode="min",
        metrics=tuple(
            [f"train/{m}_{when}" for m in ("loss", "on_diag", "off_diag") for when in ("step", "epoch")]
            + [f"val/{m}" for m in ("loss", "on_diag", "off_diag", "loss_per_dim")]
            + ["train/loss_per_dim"]
        ),
    )
)
