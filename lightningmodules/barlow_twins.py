"""Barlow Twins self-supervised pretraining (Zbontar et al., 2021) of a ViT or ResNet backbone."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from config.hparams import Hparams
from datamodules.barlow_twins import BarlowTwinsDataModule
from datamodules.transforms import blur_kernel_size
from lightningmodules.base import TaskModule, batchnorm_stats_frozen, concat_outputs  # noqa: F401  (re-exported)
from lightningmodules.registry import TASKS, Task
from models.backbones import build_backbone, check_backbone_name, is_vit
from models.dense import DenseBarlowTwins
from models.losses import barlow_twins_terms
from models.projector import Projector
from utils.registry import UnknownNameError
from utils.tuning import MIN_RELIABLE_BT_BATCH


class BarlowTwinsModule(TaskModule):
    """Backbone + projector trained so that the two views' embeddings cross-correlate to the identity.

    Logs ``{train,val}/loss``, ``/on_diag`` and ``/off_diag``; keeps the latest training cross-correlation
    matrix (``last_cross_correlation``) and the epoch-averaged validation one (``val_cross_correlation``)
    on the device for callbacks, without host syncs. The training step's scalars go through
    :class:`utils.step_logging.StepMetrics`: Lightning's ``log`` on logging steps only, epoch means summed on
    the device every step (same columns and values as ``self.log``, a fraction of its per-step cost).
    """

    def __init__(self, config: dict):
        super().__init__(config)
        self.backbone = build_backbone(self.cfg.backbone, self.cfg.data.img_size)
        self.projector = Projector(self.backbone.num_features, self.cfg.barlow.proj_dim, self.cfg.barlow.proj_layers)
        b = self.cfg.barlow
        # Optional dense term between patch tokens of matching image regions (models/dense.py).
        self.dense: Optional[DenseBarlowTwins] = None
        if b.dense_weight > 0:
            self.dense = DenseBarlowTwins(self.backbone.num_features, b.dense_proj_dim, b.proj_layers,
                                          b.dense_points, b.lambd)
        self._val_c_sum: Optional[Tensor] = None
        self._val_dense_c_sum: Optional[Tensor] = None
        self._val_batches = 0
        # The dense term's weights are checked (a host sync) on its first batch only, not every step.
        self._dense_weight_checked = False

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.barlow.micro_batch_size

    def backbone_features(self, x: Tensor) -> Tensor:
        """Backbone embeddings of a batch, in chunks of ``barlow.micro_batch_size`` images when set (the base
        class's gradient-cached :meth:`~lightningmodules.base.TaskModule.micro_batched`); with the dense term
        on, pairs (embedding, patch-token grid)."""
        return self.micro_batched(self.backbone.forward_with_patches if self.dense is not None else self.backbone, x)

    def features(self, x1: Tensor, x2: Tensor):
        """Backbone embeddings of both views, on this device's images only. With the dense term on, each
        view's features are a pair (embedding (B, D), patch-token grid (B, D, h, w))."""
        if self.backbone.batch_coupled or self.micro_batch_size > 0:
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

    def loss_terms(self, batch) -> tuple[Tensor, int, dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """Loss, global batch size, and each term's (loss, cross-correlation matrix, on-diagonal sum,
        off-diagonal sum): ``""`` the global term, ``"dense_"`` the dense one when on."""
        x1, x2, *geometry = batch
        f1, f2 = self.features(x1, x2)
        dense = None
        if self.dense is not None:
            if not geometry:
                raise ValueError("barlow.dense_weight > 0 needs batches (x1, x2, g1, g2) with crop geometry: "
                                 "build the datamodule with geometry=True")
            (f1, patches1), (f2, patches2) = f1, f2
            p1, p2, weight = (self.gather_global(t) for t in self.dense.point_features(patches1, patches2, *geometry))
            # the weight check (a host sync) on the first batch only
            dense = self.dense.terms(p1, p2, weight, check_weight=not self._dense_weight_checked)
            self._dense_weight_checked = True
        z1, z2 = self.projector(self.gather_global(f1)), self.projector(self.gather_global(f2))
        terms = {"": barlow_twins_terms(z1, z2, self.cfg.barlow.lambd)}
        loss = terms[""][0]
        if dense is not None:
            terms["dense_"] = dense
            loss = loss + self.cfg.barlow.dense_weight * dense[0]
        return loss, z1.shape[0], terms

    def shared_step(self, batch, stage: str, batch_idx: int = -1) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Loss, global cross-correlation matrix and (dense term on) the dense one, both detached; logs the
        stage's scalars (training: through ``train_metrics``, see the class docstring)."""
        loss, batch_size, terms = self.loss_terms(batch)
        if stage == "train":
            self._log_train(loss, batch_size, terms, batch_idx)
        else:
            self._log_eval(stage, loss, batch_size, terms)
        dense_c = terms["dense_"][1].detach() if "dense_" in terms else None
        return loss, terms[""][1].detach(), dense_c

    def _log_train(self, loss: Tensor, batch_size: int, terms: dict, batch_idx: int) -> None:
        m = self.train_metrics
        for prefix, (term_loss, c, on_diag, off_diag) in terms.items():
            m.add(f"train/{prefix}on_diag", on_diag)
            m.add(f"train/{prefix}off_diag", off_diag)
            if prefix:
                m.add(f"train/{prefix}loss", term_loss)
            # The loss sums D diagonal and D² − D off-diagonal terms: per dimension it compares across proj_dim.
            m.add(f"train/{prefix}loss_per_dim", term_loss.detach() / c.shape[0], on_step=False)
        if "dense_" in terms:
            m.add("train/global_loss", terms[""][0])
        m.add("train/loss", loss, prog_bar=True)
        m.commit(self, batch_size, batch_idx)

    def _log_eval(self, stage: str, loss: Tensor, batch_size: int, terms: dict) -> None:
        for prefix, (term_loss, c, on_diag, off_diag) in terms.items():
            self.log_dict({f"{stage}/{prefix}on_diag": on_diag.detach(),
                           f"{stage}/{prefix}off_diag": off_diag.detach()}, on_epoch=True, batch_size=batch_size)
            if prefix:
                self.log(f"{stage}/{prefix}loss", term_loss.detach(), on_epoch=True, batch_size=batch_size)
            self.log(f"{stage}/{prefix}loss_per_dim", term_loss.detach() / c.shape[0], on_epoch=True,
                     batch_size=batch_size)
        if "dense_" in terms:
            self.log(f"{stage}/global_loss", terms[""][0].detach(), on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=batch_size)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, c, dense_c = self.shared_step(batch, "train", batch_idx)
        self.last_cross_correlation, self.last_dense_cross_correlation = c, dense_c
        self.record_nonfinite(loss)
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


def two_view_problem(cfg: Hparams) -> Optional[str]:
    """What the two-view data (:class:`BarlowTwinsDataModule`) cannot produce, in one line naming the flag: both
    augmentation modes blur the img_size² view with reflect padding, which must be narrower than the view."""
    a = cfg.aug
    kernel = blur_kernel_size(a)
    if 0 < cfg.data.img_size <= kernel // 2:
        source = "--aug.blur_kernel_size" if a.blur_kernel_size else "the kernel implied by --aug.blur_sigma_max"
        return (f"{source} ({kernel} px) needs {kernel // 2} px of reflect padding, which must be less "
                f"than --data.img_size={cfg.data.img_size}; use a kernel of at most {2 * cfg.data.img_size - 1}")
    return None


def check_config(cfg: Hparams) -> Optional[str]:
    """What --task=barlow_twins cannot train, in one line naming the flag (pass 2 of config/validation.py)."""
    problem = two_view_problem(cfg)
    if problem or cfg.barlow.dense_weight <= 0:
        return problem
    try:
        check_backbone_name(cfg.backbone.name)
    except UnknownNameError:
        return None  # the backbone check names the valid ones
    if not is_vit(cfg.backbone.name):
        return (f"--barlow.dense_weight needs a ViT backbone (it matches patch tokens); "
                f"--backbone.name={cfg.backbone.name} has none")
    return None


TASKS.register("barlow_twins")(
    Task(
        module=BarlowTwinsModule,
        datamodule=lambda cfg: BarlowTwinsDataModule(cfg.data, cfg.aug, cfg.seed, geometry=cfg.barlow.dense_weight > 0,
                                                     shared_crop=cfg.barlow.shared_crop),
        monitor="val/loss",
        mode="min",
        pretraining=True,
        views=2,
        diagnostic="cross_correlation",
        report=("val/loss", "final"),
        min_reliable_batch=MIN_RELIABLE_BT_BATCH,
        min_reliable_batch_reason="Barlow Twins' cross-correlation matrix is estimated over the batch and the "
                                  "report saw it explode",
        check_config=check_config,
        metrics=tuple(
            [f"train/{m}_{when}" for m in ("loss", "on_diag", "off_diag") for when in ("step", "epoch")]
            + [f"val/{m}" for m in ("loss", "on_diag", "off_diag", "loss_per_dim")]
            + ["train/loss_per_dim"]
        ),
    )
)
