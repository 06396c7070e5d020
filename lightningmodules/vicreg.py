"""VICReg self-supervised pretraining (Bardes et al., 2022) of a ViT or ResNet backbone, as
facebookresearch/vicreg's ``main_vicreg.py`` trains it.

Backbone + expander (Linear-BatchNorm-ReLU layers, the last Linear without bias; official 8192-8192-8192),
each view through its own pass; loss :func:`models.losses.vicreg_terms` (invariance, variance, covariance
with weights 25 / 25 / 1); LARS with base rate 0.2 × batch / 256, weight decay 1e-6, biases and norms
excluded from decay and adaptation, 10 warmup epochs then a cosine to 0.001 × the peak (the task's defaults,
``config.hparams.TASK_DEFAULTS``). The two-view data and augmentations are Barlow Twins' (the official
``augmentations.TrainTransform`` is the same recipe).

Multi-device (DDP): the backbone features are gathered from every device with gradients and the expander and
the loss run on the global batch on each device, so the expander's BatchNorm normalises over the global
batch (the official SyncBatchNorm) and the loss is the one-process loss on the concatenated batch; the
backbone gradients are then the one-process ones too (see :meth:`TaskModule.gather_global`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from config.hparams import Hparams
from datamodules.barlow_twins import BarlowTwinsDataModule
from lightningmodules.barlow_twins import two_view_problem
from lightningmodules.base import TaskModule
from lightningmodules.registry import TASKS, Task
from models.backbones import build_backbone
from models.losses import vicreg_terms

TERMS = ("invariance", "variance", "covariance")


def expander_widths(spec: str) -> list[int]:
    """``"8192-8192-8192"`` → [8192, 8192, 8192]; ValueError naming the flag on anything else."""
    try:
        widths = [int(part) for part in spec.split("-")]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"--vicreg.expander={spec!r}: expected dash-separated positive widths, e.g. 8192-8192-8192")
    return widths


def build_expander(in_dim: int, spec: str) -> nn.Sequential:
    """The official ``Projector(args, embedding)``: Linear + BatchNorm1d + ReLU per hidden width, then a
    Linear without bias."""
    widths = [in_dim, *expander_widths(spec)]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(True)]
    layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
    return nn.Sequential(*layers)


class VICRegModule(TaskModule):
    """Backbone + expander trained with the VICReg loss. Logs ``{train,val}/loss`` and the three unweighted
    terms ``{train,val}/invariance``, ``/variance``, ``/covariance``."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.backbone = build_backbone(self.cfg.backbone, self.cfg.data.img_size)
        self.expander = build_expander(self.backbone.num_features, self.cfg.vicreg.expander)

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.vicreg.micro_batch_size

    def features(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone embeddings of both views of this device's images (gradient-cached chunks when
        ``vicreg.micro_batch_size`` is set)."""
        if self.backbone.batch_coupled or self.micro_batch_size > 0:
            return self.micro_batched(self.backbone, x1), self.micro_batched(self.backbone, x2)
        return self.micro_batched(self.backbone, torch.cat([x1, x2])).chunk(2)

    def embed(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Expander outputs of both views of this device's images (each view its own BatchNorm pass)."""
        f1, f2 = self.features(x1, x2)
        return self.expander(f1), self.expander(f2)

    def loss_terms(self, batch) -> tuple[Tensor, int, tuple[Tensor, Tensor, Tensor]]:
        """(loss, global batch size, (invariance, variance, covariance)) of one batch (x1, x2, ...)."""
        x1, x2 = batch[0], batch[1]
        f1, f2 = self.features(x1, x2)
        z1, z2 = self.expander(self.gather_global(f1)), self.expander(self.gather_global(f2))
        v = self.cfg.vicreg
        loss, *terms = vicreg_terms(z1, z2, v.sim_coeff, v.std_coeff, v.cov_coeff)
        return loss, z1.shape[0], tuple(terms)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, batch_size, terms = self.loss_terms(batch)
        for name, value in zip(TERMS, terms):
            self.train_metrics.add(f"train/{name}", value)
        self.train_metrics.add("train/loss", loss, prog_bar=True)
        self.train_metrics.commit(self, batch_size, batch_idx)
        self.record_nonfinite(loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        loss, batch_size, terms = self.loss_terms(batch)
        self.log_dict({f"val/{name}": value.detach() for name, value in zip(TERMS, terms)}, on_epoch=True,
                      batch_size=batch_size)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss


def check_config(cfg: Hparams) -> Optional[str]:
    """What --task=vicreg cannot train, in one line naming the flag (pass 2 of config/validation.py)."""
    try:
        expander_widths(cfg.vicreg.expander)
    except ValueError as err:
        return str(err)
    if cfg.vicreg.micro_batch_size < 0:
        return f"--vicreg.micro_batch_size must be >= 0 (0 = off), got {cfg.vicreg.micro_batch_size}"
    if cfg.data.batch_size < 2:
        return f"--data.batch_size={cfg.data.batch_size}: VICReg's variance and covariance need at least 2 images"
    return two_view_problem(cfg)  # Barlow Twins' two-view data


TASKS.register("vicreg")(
    Task(
        module=VICRegModule,
        datamodule=lambda cfg: BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed),
        monitor="val/loss",
        mode="min",
        pretraining=True,
        views=2,
        report=("val/loss", "final"),
        metrics=tuple([f"train/{m}_{when}" for m in ("loss", *TERMS) for when in ("step", "epoch")]
                      + [f"val/{m}" for m in ("loss", *TERMS)]),
        check_config=check_config,
    )
)
