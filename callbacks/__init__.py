"""Optional training behaviour, each in its own callback; :func:`visualisation_callbacks` builds the
pictures and the during-training measurements (emergence Jaccard, online probe) the config asks for."""
from __future__ import annotations

import pytorch_lightning as pl

from callbacks.attention_maps import AttentionMapCallback
from callbacks.cross_correlation import CrossCorrelationCallback, convergence_scalars
from callbacks.dino_entropy import TeacherEntropyCallback
from callbacks.emergence import EmergenceCallback
from callbacks.online_probe import OnlineProbeCallback
from callbacks.predictions import PredictionsCallback
from callbacks.receptive_field import ReceptiveFieldCallback
from callbacks.views import ViewPairsCallback
from callbacks.visual import parse_indices
from config.hparams import Hparams
from lightningmodules import TASKS


def _cross_correlation(cfg: Hparams) -> list[pl.Callback]:
    if not cfg.callbacks.cross_correlation:
        return []
    return [CrossCorrelationCallback(block=cfg.callbacks.cross_correlation_block, every_n_epochs=cfg.callbacks.every_n_epochs)]


def _teacher_entropy(cfg: Hparams) -> list[pl.Callback]:
    if not cfg.callbacks.teacher_entropy:
        return []
    return [TeacherEntropyCallback(every_n_epochs=cfg.callbacks.every_n_epochs)]


TRAINING_DIAGNOSTICS = {CrossCorrelationCallback.name: _cross_correlation, TeacherEntropyCallback.name: _teacher_entropy}
"""The "is it converging" pictures a task's registry entry can name (``Task.diagnostic``): the two views'
cross-correlation matrices (Barlow Twins), a teacher's entropy against the entropy of its mean output (DINO's
collapse monitor)."""


def visualisation_callbacks(cfg: Hparams) -> list[pl.Callback]:
    c = cfg.callbacks
    common = {"every_n_epochs": c.every_n_epochs, "num_images": c.num_images}
    out: list[pl.Callback] = []
    if c.attention:
        out.append(AttentionMapCallback(blocks=parse_indices(c.attention_blocks, "--callbacks.attention_blocks"),
                                        keep=c.attention_keep, **common))
    if c.erf:
        out.append(ReceptiveFieldCallback(layers=c.erf_layers, log_scale=c.erf_log_scale, every_n_epochs=c.every_n_epochs,
                                          num_images=c.erf_images))
    task = TASKS.get(cfg.task)
    if task.diagnostic is not None:
        out += TRAINING_DIAGNOSTICS[task.diagnostic](cfg)
    if task.pretraining:
        if c.views:
            out.append(ViewPairsCallback(**common))
        if c.emergence:
            out.append(EmergenceCallback(num_images=c.emergence_images, every_n_epochs=c.emergence_every_n_epochs,
                                         keep=c.attention_keep, corloc=c.emergence_corloc))
        if c.online_probe:
            out.append(OnlineProbeCallback.from_hparams(cfg))
    if not task.pretraining and c.predictions:
        out.append(PredictionsCallback(**common))
    return out


def callback_metrics(cfg: Hparams) -> tuple[str, ...]:
    """The scalar names the callbacks of this config log besides the task's own (``Task.metrics``), for
    checking a sweep's metric: the emergence Jaccard, the online probe's scores, Barlow Twins'
    cross-correlation scalars, the epoch timer's time. Per-head Jaccard columns are left out."""
    c = cfg.callbacks
    names: list[str] = ["time/train_epoch_s"]
    task = TASKS.get(cfg.task)
    if task.diagnostic == CrossCorrelationCallback.name and c.cross_correlation:
        import torch

        keys = list(convergence_scalars(torch.eye(2)))
        names += [f"cc/{k}" for k in keys]
        if cfg.barlow.dense_weight > 0:
            names += [f"cc_dense/{k}" for k in keys]
    if task.pretraining:
        if c.emergence:
            names.append("val/attn_jaccard")
            if c.emergence_corloc:
                names += ["val/corloc_lost", "val/corloc_tokencut"]
        if c.online_probe:
            names += ["val/probe_mIoU", "val/probe_mIoU_fg", "val/probe_pixel_acc", "train/probe_loss"]
    return tuple(names)
