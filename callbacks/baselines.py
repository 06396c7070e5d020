"""Reference probes trained inside a segmentation run, so that its mIoU comes with the number to compare it to.

``--segmentation.baselines random_init,pixels`` trains, beside the run's own segmenter, one more segmenter
per reference, under exactly the run's protocol:

- **random_init**: the same backbone architecture, randomly initialised (the weights it would have had
  without ``--backbone.weights``/``--backbone.pretrained``) and frozen — what pretraining must beat;
- **pixels**: raw pixel patches of the same patch size (``models/backbones/pixels.py``) — the floor any
  feature must beat.

Same head (architecture and, for random_init, the very same initial weights: both are built from
``seed`` exactly as the run's module is), same training batches (each reference steps on the batch the run
just trained on, after the run's own optimiser step), same loss and class weights, same optimiser and
learning-rate schedule (the run's own schedule function), same gradient clipping, same validation batches
and metric (one confusion matrix per epoch, label 255 ignored). Logged per validation epoch as
``val/mIoU_<name>`` (and ``val/mIoU_fg_<name>``); :func:`summary_note` puts their best values into the
run's final line. The cost is measured and logged as ``time/baselines_s`` per epoch.

The references never change the run: their steps draw random numbers from a generator seeded per step
(the global RNG is restored), they are not part of the LightningModule (not in its optimiser, its
``state_dict`` or its checkpoint's weights), and their state (trainable weights, optimiser, schedule, best
scores) is saved with every checkpoint as this callback's state, so a resumed run continues them. A reference
the run already is (random_init for a run without weights, pixels for a pixels run) is skipped, and so is
every reference for a CNN backbone or a multi-process run (they would need their own gradient sync); the log
says why.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks.emergence import tuning
from callbacks.online_probe import confusion_matrix
from config.hparams import Hparams
from config.loading import from_dict, to_dict
from datamodules.sampling import mix_seed
from models.backbones import is_vit, resolve_architecture
from models.segmenters import build_segmenter
from utils.optim import optimizer_from_groups, parameter_groups
from utils.segmentation_metrics import scores_from_confusion
from utils.step_logging import is_logging_step

log = logging.getLogger(__name__)

BASELINES = ("random_init", "pixels")
LABELS = {"random_init": "random-init backbone, same probe", "pixels": "raw pixels"}
"""How the final line names each reference."""
STEP_STREAM = 0x626173656C696E65  # "baseline": the references' per-step seeds, apart from every other stream


def parse_baselines(text: str) -> list[str]:
    """'random_init, pixels' → ['random_init', 'pixels']; ValueError naming the flag for anything else."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise ValueError(f"--segmentation.baselines: unknown baseline {bad[0]!r} (valid: {', '.join(BASELINES)}, "
                         f"comma-separated)")
    return list(dict.fromkeys(names))


def check_config(cfg: Hparams) -> Optional[str]:
    """One line naming the flag when ``--segmentation.baselines`` cannot be parsed, else None."""
    try:
        parse_baselines(cfg.segmentation.baselines)
    except ValueError as err:
        return str(err)
    return None


def baseline_config(cfg: Hparams, name: str) -> Hparams:
    """The run's config with the backbone replaced by the reference's (everything else unchanged)."""
    config = to_dict(cfg)
    backbone = config["backbone"]
    backbone.update(weights="", pretrained=False)
    if name == "pixels":
        backbone.update(name="pixels", patch_size=resolve_architecture(cfg.backbone)["patch_size"], depth=0,
                        embed_dim=0, num_heads=0)
    return from_dict(config, source=f"--segmentation.baselines {name}")


def why_skipped(cfg: Hparams, name: str) -> Optional[str]:
    """Why reference ``name`` is not trained in this run (the run is that reference, or it cannot be), or None."""
    if not is_vit(cfg.backbone.name):
        return f"the {cfg.backbone.name} backbone is not a ViT (references are built for ViT heads)"
    if name == "random_init" and cfg.backbone.name != "pixels" and not (cfg.backbone.weights or cfg.backbone.pretrained):
        return "this run's backbone is itself randomly initialised: the run is its own random-init reference"
    if name == "pixels" and cfg.backbone.name == "pixels":
        return "this run is the raw-pixel reference"
    if name == "random_init" and cfg.backbone.name == "pixels":
        return "raw pixels have no weights to randomise"
    return None


@dataclass
class Reference:
    """One reference segmenter, its optimiser and schedule, its running validation confusion matrix and scores."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
    confusion: Optional[Tensor] = None
    history: list[tuple[int, int, float]] = field(default_factory=list)
    """(epoch, global step, val mIoU) of every validation epoch."""

    def best(self) -> Optional[tuple[int, float]]:
        """(epoch, mIoU) of the best validation epoch, the earliest among equals; None before the first."""
        scored = [(e, v) for e, _, v in self.history if v == v]
        return max(scored, key=lambda ev: (ev[1], -ev[0])) if scored else None


class BaselinesCallback(pl.Callback):
    """See the module docstring. ``cfg`` is the run's config."""

    def __init__(self, cfg: Hparams):
        self.cfg = cfg
        self.wanted = parse_baselines(cfg.segmentation.baselines)
        self.references: dict[str, Reference] = {}
        self.skipped: dict[str, str] = {}
        self.seconds = 0.0  # measured cost in this process, all references together
        self._epoch_seconds = 0.0
        self._pending: Optional[dict] = None

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.references:
            return
        for name in self.wanted:
            reason = why_skipped(self.cfg, name)
            if reason is None and trainer.world_size > 1:
                reason = "it runs in single-process runs only"
            if reason is not None:
                self.skipped[name] = reason
                log.info("baseline %s is not trained: %s", name, reason)
                continue
            with torch.random.fork_rng(devices=[]):  # built exactly as the run's module was: from the seed
                torch.manual_seed(self.cfg.seed)
                model = build_segmenter(baseline_config(self.cfg, name))
            model.to(pl_module.device)
            groups = [g for m in model.head_modules() for g in parameter_groups(m, self.cfg.optim, pl_module.lr)]
            if not self.cfg.segmentation.freeze_backbone and name != "pixels":
                groups += parameter_groups(model.backbone, self.cfg.optim, self.cfg.segmentation.backbone_lr)
            self.references[name] = Reference(name, model, optimizer_from_groups(groups, self.cfg.optim, pl_module.lr))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.references:
            return
        # The run's own schedule function (warmup + cosine over its steps), applied to each reference.
        configs = getattr(trainer, "lr_scheduler_configs", [])
        lambdas = getattr(configs[0].scheduler, "lr_lambdas", None) if configs else None
        for ref in self.references.values():
            ref.model.to(pl_module.device)
            if lambdas:
                ref.scheduler = torch.optim.lr_scheduler.LambdaLR(ref.optimizer, lambdas[0])
        pending, self._pending = self._pending, None
        for name, state in (pending or {}).get("references", {}).items():
            ref = self.references.get(name)
            if ref is None:
                continue
            ref.model.load_state_dict(state["trainable"], strict=False)
            ref.optimizer.load_state_dict(state["optimizer"])
            if ref.scheduler is not None and state.get("scheduler"):
                ref.scheduler.load_state_dict(state["scheduler"])
            ref.history = [tuple(h) for h in state.get("history", [])]

    def active(self, trainer: pl.Trainer) -> bool:
        return bool(self.references) and not tuning(trainer)

    # -- training --------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active(trainer):
            return
        start = time.perf_counter()
        images, masks = batch
        devices = [images.device] if images.device.type == "cuda" else []
        losses = {}
        for index, ref in enumerate(self.references.values()):
            with torch.random.fork_rng(devices=devices):  # dropout draws from a stream of its own
                torch.manual_seed(mix_seed(self.cfg.seed, STEP_STREAM, index, trainer.global_step))
                ref.model.train()
                with torch.enable_grad():
                    with trainer.precision_plugin.forward_context():
                        out = ref.model(images)
                    loss = pl_module.loss(out, masks)  # the run's loss, class weights included
                    ref.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if trainer.gradient_clip_val:
                    params = [p for g in ref.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, float(trainer.gradient_clip_val))
                ref.optimizer.step()
                if ref.scheduler is not None:
                    ref.scheduler.step()
            losses[f"train/loss_{ref.name}"] = loss.detach()
        if is_logging_step(trainer):
            pl_module.log_dict(losses, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self._add_time(images, start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.active(trainer):
            pl_module.log("time/baselines_s", self._epoch_seconds, on_step=False, on_epoch=True)
            self._epoch_seconds = 0.0

    # -- validation ------------------------------------------------------------------------------------
    def evaluating(self, trainer: pl.Trainer) -> bool:
        return self.active(trainer) and not trainer.sanity_checking and trainer.state.fn == "fit"

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.evaluating(trainer):
            return
        start = time.perf_counter()
        images, masks = batch
        classes = self.cfg.segmentation.num_classes
        for ref in self.references.values():
            ref.model.eval()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                logits = ref.model(images)["out"].float()
            if ref.confusion is None:
                ref.confusion = torch.zeros(classes, classes, dtype=torch.long, device=images.device)
            if isinstance(masks, list):  # eval_mode=full: logits back to each image's own size, as the run does
                for one, mask in zip(logits, masks):
                    one = F.interpolate(one[None], size=mask.shape[-2:], mode="bilinear", align_corners=False)
                    ref.confusion += confusion_matrix(one.argmax(1), mask[None], classes)
            else:
                ref.confusion += confusion_matrix(logits.argmax(1), masks, classes)
        self._add_time(images, start)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.evaluating(trainer):
            return
        metrics = {}
        for ref in self.references.values():
            if ref.confusion is None:
                continue
            scores = scores_from_confusion(ref.confusion.cpu())
            ref.confusion = None
            ref.history.append((trainer.current_epoch, trainer.global_step, float(scores["mIoU"])))
            metrics[f"val/mIoU_{ref.name}"] = float(scores["mIoU"])
            metrics[f"val/mIoU_fg_{ref.name}"] = float(scores["mIoU_fg"])
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.references:
            log.info("baselines (%s) took %.1f s of this run", ", ".join(self.references), self.seconds)

    def _add_time(self, images: Tensor, start: float) -> None:
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)  # measured honestly: the references' kernels included
        spent = time.perf_counter() - start
        self.seconds += spent
        self._epoch_seconds += spent

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per reference: its trainable tensors (the frozen random backbone is rebuilt from the seed), optimiser,
        schedule and history; plain tensors and values only (``torch.load(weights_only=True)``)."""
        out = {}
        for name, ref in self.references.items():
            trainable = {k: v for k, v in ref.model.state_dict().items()
                         if not k.startswith("backbone.") or not self.cfg.segmentation.freeze_backbone}
            out[name] = {"trainable": trainable, "optimizer": ref.optimizer.state_dict(),
                         "scheduler": ref.scheduler.state_dict() if ref.scheduler is not None else None,
                         "history": [list(h) for h in ref.history]}
        return {"references": out} if out else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)  # applied in on_train_start, once the references are on the device


def build_baselines(cfg: Hparams) -> list[pl.Callback]:
    """The callback when the config asks for references in a segmentation run, else nothing."""
    if cfg.task != "segmentation" or not parse_baselines(cfg.segmentation.baselines) or cfg.trainer.eval_only:
        return []
    return [BaselinesCallback(cfg)]


def summary_note(trainer: pl.Trainer) -> str:
    """`` (random-init backbone, same probe: 0.0523; raw pixels: 0.0311)``: the best validation mIoU of each
    reference trained in this run, for the final line; '' when there is none."""
    callback = next((c for c in trainer.callbacks if isinstance(c, BaselinesCallback)), None)
    if callback is None:
        return ""
    parts = []
    for name, ref in callback.references.items():
        best = ref.best()
        if best is not None:
            parts.append(f"{LABELS[name]}: {best[1]:.4f}")
    return f" ({'; '.join(parts)})" if parts else ""
