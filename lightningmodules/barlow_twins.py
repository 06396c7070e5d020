"""Barlow Twins self-supervised pretraining (Zbontar et al., 2021) of a ViT or ResNet backbone."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from config.hparams import Hparams
from config.loading import from_dict, to_dict
from datamodules.barlow_twins import BarlowTwinsDataModule
from lightningmodules.nonfinite import record_nonfinite
from lightningmodules.registry import TASKS, Task
from models.backbones import build_backbone
from models.dense import DenseBarlowTwins
from models.losses import barlow_twins_terms
from models.projector import Projector
from utils.optim import build_optimizer, effective_lr, parameter_groups, rescale_checkpoint_lrs
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


class BarlowTwinsModule(StepMetricsHooks, pl.LightningModule):
    """Backbone + projector trained so that the two views' embeddings cross-correlate to the identity.

    Logs ``{train,val}/loss``, ``/on_diag`` and ``/off_diag``; keeps the latest training cross-correlation
    matrix (``last_cross_correlation``) and the epoch-averaged validation one (``val_cross_correlation``)
    on the device for callbacks, without host syncs. The training step's scalars go through
    :class:`utils.step_logging.StepMetrics`: Lightning's ``log`` on logging steps only, epoch means summed on
    the device every step (same columns and values as ``self.log``, a fraction of its per-step cost).
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
        self.train_metrics = StepMetrics()
        # The dense term's weights are checked (a host sync) on its first batch only, not every step.
        self._dense_weight_checked = False
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
            # DenseBarlowTwins.loss, with the weight check (a host sync) on the first batch only
            dense = barlow_twins_terms(self.dense.projector(p1), self.dense.projector(p2), self.dense.lambd, weight,
                                       check_weight=not self._dense_weight_checked)
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
