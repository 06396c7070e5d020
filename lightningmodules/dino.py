"""DINO self-distillation (Caron et al., 2021) of a ViT or ResNet backbone, as facebookresearch/dino's
``main_dino.py`` trains it.

One training step (iteration ``it`` = the global step, epoch ``e``), in the official order:

1. the regularised parameter group's weight decay is set to ``wd(it)``, a cosine from ``optim.weight_decay``
   to ``dino.weight_decay_end`` over the run; the learning rate follows the official schedule (linear
   warmup from 0 over ``optim.warmup_epochs``, then a cosine to ``optim.min_lr_ratio`` × the peak), stepped
   every iteration by a LambdaLR;
2. the teacher (EMA copy of the student, no gradients, no stochastic depth) sees the 2 global crops; the
   student (backbone + :class:`~models.dino_head.DINOHead`) sees all crops, one backbone pass per run of
   same-resolution crops (the official ``MultiCropWrapper``) and one head pass over all of them; a ViT
   resamples its position embedding for the local crops as the official ViT does
   (:func:`interpolate_pos_encoding`, not timm's antialiased resampling);
3. loss :func:`models.losses.dino_loss` with the center of the previous steps and the teacher temperature
   of epoch ``e`` (linear warmup over ``dino.warmup_teacher_temp_epochs``); then the center moves towards the
   mean teacher output of the global batch (all-reduced over devices), momentum ``dino.center_momentum``;
4. backward; each parameter's gradient clipped to norm ``dino.clip_grad`` separately (official
   ``clip_gradients``); while ``e < dino.freeze_last_layer_epochs`` the head's last layer loses its gradients
   (``p.grad = None``, so AdamW skips it entirely, decay included), then the optimiser step;
5. teacher ← m(it) · teacher + (1 − m(it)) · student over the parameters (buffers are not averaged, as
   there), m a cosine from ``dino.momentum_teacher`` to 1 over the run.

The teacher is in train mode while training, as the official one (which is never switched to eval): for a
ViT that is eval semantics, since its stochastic depth is removed and it has no dropout or BatchNorm; a
ResNet-50 teacher normalises the global crops with their batch statistics, as there.

Where the framework makes this differ from the official code:

* Schedules are functions of the global step and ``trainer.estimated_stepping_batches`` (the official arrays
  have epochs × len(data_loader) entries); with ``--trainer.max_steps`` or ``limit_train_batches`` they span
  the steps actually run. They are therefore restored exactly on resume (global step and epoch are in the
  checkpoint, as are the teacher, the center and the optimiser and LR-scheduler states).
* The learning-rate floor is ``optim.min_lr_ratio`` × the peak (``--task=dino`` sets 0.002: the official
  ``min_lr`` 1e-6 at batch 256) where the official ``min_lr`` is absolute.
* Under mixed precision the center and the entropies sum the teacher logits in float32 (the official code
  sums them in the autocast dtype); the loss is computed in float32 either way.
* The step never waits for the device: there is no ``loss.item()`` finiteness check per step (the shared
  ``FiniteLossGuard`` reads a device-side flag every few steps instead) and all logged values are tensors or
  host-side schedule values.

Multi-device (DDP): each device computes the loss on its own images (a mean of per-image terms) and DDP
averages the gradients, which for equal per-device batches is the gradient of the loss on the global batch;
the center is the one quantity computed over the global batch, by an all-reduce of the teacher-logit sums
(as the official ``update_center``). See docs/distributed.md.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from config.hparams import Hparams
from datamodules.dino import DinoDataModule
from datamodules.multicrop import multicrop_problem, resolve_local_size
from lightningmodules.base import TaskModule
from lightningmodules.registry import TASKS, Task
from models.backbones import backbone_kind, build_backbone, check_backbone_name, input_granularity, is_vit
from models.backbones.vit import ViTBackbone
from models.dino_head import DINOHead
from models.losses import dino_loss, dino_teacher_entropies
from utils.optim import optimizer_from_groups
from utils.schedule import log_effective_lr
from utils.registry import UnknownNameError
from utils.step_logging import is_logging_step


# ------------------------------------------------------------------------------------------- schedules
def linspace_value(start: float, stop: float, num: int, i: int) -> float:
    """``np.linspace(start, stop, num)[i]``, with numpy's arithmetic (i · step + start; the last entry is
    ``stop`` exactly)."""
    if num == 1:
        return start
    if i == num - 1:
        return stop
    return i * ((stop - start) / (num - 1)) + start


def cosine_schedule(step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> float:
    """Value at ``step`` (0-based) of the official ``utils.cosine_scheduler(base, final, epochs, niter,
    warmup_epochs, start_warmup_value)`` array with ``total_steps`` = epochs × niter entries and
    ``warmup_steps`` = warmup_epochs × niter: ``np.linspace(start_warmup, base, warmup_steps)`` first (the
    warmup reaches ``base`` at its last step), then
    ``final + 0.5 (base − final)(1 + cos(π i / (total − warmup)))`` for i = step − warmup. Past the end of the
    array (a run extended on resume) it stays at ``final``."""
    if step < warmup_steps:
        return linspace_value(start_warmup, base, warmup_steps, step)
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return final
    i = min(step - warmup_steps, decay_steps)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / decay_steps))


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """The official ``DINOLoss.teacher_temp_schedule[epoch]``: ``np.linspace(warmup_temp, temp, warmup_epochs)``
    over the first epochs (reaching ``temp`` at the last warmup epoch), ``temp`` after."""
    return linspace_value(warmup_temp, temp, warmup_epochs, epoch) if epoch < warmup_epochs else temp


# ------------------------------------------------------------------------------------------- helpers
def teacher_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` (same weights, no gradients) with stochastic depth removed: the official
    teacher is built with no drop_path_rate (timm's DropPath becomes the Identity a rate of 0 gives)."""
    teacher = copy.deepcopy(module)
    for parent in list(teacher.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DropPath):
                setattr(parent, name, nn.Identity())
    teacher.requires_grad_(False)
    return teacher


def interpolate_pos_encoding(pos_embed: Tensor, rows: int, cols: int) -> Tensor:
    """The official ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino) for a rows × cols
    patch grid: the class entry unchanged, the n × n patch entries resampled by bicubic ``interpolate`` with
    ``scale_factor = ((rows + 0.1) / n, (cols + 0.1) / n)`` (no antialiasing). timm's own resampling for other
    input sizes (``dynamic_img_size``) is bicubic *with* antialiasing to an exact size: at ViT-S/16 init, for
    the 96 px local crops (14 × 14 → 6 × 6), the two differ by 81 percent of the embedding's norm (5 percent
    for a smooth embedding)."""
    num_patches = pos_embed.shape[1] - 1
    n = math.isqrt(num_patches)
    if num_patches == rows * cols and (rows == cols or n * n != num_patches):
        return pos_embed
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = rows + 0.1, cols + 0.1  # the official offset against rounding down in interpolate
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, n, n, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(num_patches), h0 / math.sqrt(num_patches)),
        mode="bicubic",
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


class OfficialPositionViT(VisionTransformer):
    """A timm VisionTransformer whose position embedding, for inputs of another size than it was built for
    (DINO's local crops), is resampled as the official DINO ViT does (:func:`interpolate_pos_encoding`), not
    by timm's ``dynamic_img_size`` resampling. Same parameters and state dict as the timm model."""

    def _pos_embed(self, x: Tensor) -> Tensor:
        batch, rows, cols, dim = x.shape  # dynamic_img_size: the patch embedding keeps the grid (B, H, W, C)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(x + interpolate_pos_encoding(self.pos_embed, rows, cols))


def use_official_position_interpolation(backbone: nn.Module) -> bool:
    """Give a ViT backbone of DINO's layout (one class token, its position embedding included, timm's
    ``dynamic_img_size``) the official position-embedding interpolation, in place (:class:`OfficialPositionViT`).
    Other backbones (ResNet-50, ViTs with register tokens or without a class-token embedding) keep theirs.
    Returns whether it changed anything."""
    vit = getattr(backbone, "vit", None) if isinstance(backbone, ViTBackbone) else None
    if (type(vit) is not VisionTransformer or vit.pos_embed is None or vit.cls_token is None or vit.no_embed_class
            or vit.num_prefix_tokens != 1 or not vit.dynamic_img_size):
        return False
    vit.__class__ = OfficialPositionViT
    return True


def resolution_runs(crops: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive crops with the same width: the official MultiCropWrapper's
    ``unique_consecutive`` over ``shape[-1]`` (without its host round trip: shapes are Python ints)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-1] != crops[start].shape[-1]:
            runs.append((start, i))
            start = i
    return runs


def clip_gradients_per_parameter(parameters: Sequence[nn.Parameter], clip: float) -> None:
    """The official ``utils.clip_gradients``: every gradient whose norm exceeds ``clip`` is scaled by
    clip / (norm + 1e-6), each parameter separately; without its host syncs (the scale is clamped at 1
    instead of tested on the host; multiplying by exactly 1 changes nothing)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


def crops_of(batch) -> list[Tensor]:
    """The list of crops of a DINO batch (2 global views first, then the local ones)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not all(isinstance(c, Tensor) for c in batch):
        raise ValueError("a DINO batch is a list of crops [global 1, global 2, local 1, ...] of (B, 3, H, W) tensors; "
                         f"got {type(batch).__name__}")
    return list(batch)


# ------------------------------------------------------------------------------------------- module
class DinoModule(TaskModule):
    """Student (``backbone`` + ``head``) trained to match the EMA teacher (``teacher_backbone`` +
    ``teacher_head``) across crops; buffer ``center`` (1, out_dim).

    Logs ``train/loss`` (step and epoch), ``val/loss``, ``train/teacher_entropy`` and
    ``train/teacher_mean_entropy`` (every step), ``dino/teacher_momentum``, ``dino/teacher_temp`` and
    ``optim/weight_decay``. Keeps the latest entropies as detached device tensors ``last_teacher_entropy``
    (mean over the global batch's teacher outputs of the entropy of softmax((t − center) / teacher_temp)) and
    ``last_teacher_mean_entropy`` (entropy of the batch mean of that softmax): DINO's collapse monitor — the
    first near 0 with the second near 0 is one dimension dominating, both near log K uniform outputs.
    """

    evaluated_role = "teacher"  # evaluation probes read the teacher, as DINO evaluates

    def __init__(self, config: dict):
        super().__init__(config)
        d = self.cfg.dino
        self.backbone = build_backbone(self.cfg.backbone, self.cfg.data.img_size)
        use_official_position_interpolation(self.backbone)  # local crops: the official pos-embed resampling
        self.head = DINOHead(self.backbone.num_features, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.head_layers,
                             d.use_bn_in_head, d.norm_last_layer)
        # The teacher starts as the student's copy (official: teacher.load_state_dict(student.state_dict())).
        self.teacher_backbone = teacher_copy(self.backbone)
        self.teacher_head = teacher_copy(self.head)
        self.register_buffer("center", torch.zeros(1, d.out_dim))
        self.output_dim = d.out_dim
        self.schedule_steps = 1
        """Iterations the schedules span (``trainer.estimated_stepping_batches``, set by configure_optimizers)."""
        self._iteration = 0

    def named_backbones(self) -> dict[str, nn.Module]:
        """The backbones pictures and probes may look at; evaluation probes use the teacher, as DINO does."""
        return {"teacher": self.teacher_backbone, "student": self.backbone}

    # ------------------------------------------------------------------------------------ schedules
    def teacher_momentum_at(self, step: int) -> float:
        return cosine_schedule(step, self.cfg.dino.momentum_teacher, 1.0, self.schedule_steps)

    def weight_decay_at(self, step: int) -> float:
        return cosine_schedule(step, self.cfg.optim.weight_decay, self.cfg.dino.weight_decay_end, self.schedule_steps)

    def teacher_temp_at(self, epoch: int) -> float:
        d = self.cfg.dino
        return teacher_temperature(epoch, d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs)

    def lr_factor_at(self, step: int, warmup_steps: int) -> float:
        return cosine_schedule(step, 1.0, self.cfg.optim.min_lr_ratio, self.schedule_steps, warmup_steps)

    # ------------------------------------------------------------------------------------ forward passes
    @property
    def micro_batch_size(self) -> int:
        return self.cfg.dino.micro_batch_size

    def backbone_features(self, x: Tensor) -> Tensor:
        """Student backbone embeddings, in chunks of ``dino.micro_batch_size`` images when set (the base
        class's gradient-cached :meth:`~lightningmodules.base.TaskModule.micro_batched`): the head and the
        loss see the whole batch, the backbone's activation memory is one chunk's."""
        return self.micro_batched(self.backbone, x)

    def student_logits(self, crops: Sequence[Tensor]) -> Tensor:
        """(V·B, K): one backbone pass per run of same-size crops, one head pass over all (MultiCropWrapper)."""
        features = [self.backbone_features(torch.cat(list(crops[a:b])) if b - a > 1 else crops[a])
                    for a, b in resolution_runs(crops)]
        return self.head(torch.cat(features) if len(features) > 1 else features[0])

    @torch.no_grad()
    def teacher_logits(self, global_crops: Sequence[Tensor]) -> Tensor:
        """(2·B, K) teacher outputs of the global crops, no graph."""
        features = [self.teacher_backbone(torch.cat(list(global_crops[a:b])) if b - a > 1 else global_crops[a])
                    for a, b in resolution_runs(global_crops)]
        return self.teacher_head(torch.cat(features) if len(features) > 1 else features[0])

    def losses(self, crops: Sequence[Tensor], epoch: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(loss, teacher logits (2B, K), teacher targets) of one batch of crops on this device."""
        teacher = self.teacher_logits(crops[:2])
        student = self.student_logits(crops)
        loss, targets = dino_loss(student.chunk(len(crops)), teacher.chunk(2), self.center,
                                  self.cfg.dino.student_temp, self.teacher_temp_at(epoch), return_targets=True)
        return loss, teacher, targets

    # ------------------------------------------------------------------------------------ center
    @torch.no_grad()
    def update_center(self, teacher: Tensor, targets: list[Tensor]) -> None:
        """The official ``DINOLoss.update_center`` (center ← m · center + (1 − m) · mean teacher logit over the
        global batch: all-reduced sum / (local batch × world size)), and the entropy diagnostics over the
        global batch, in one all-reduce."""
        out_dim = teacher.shape[-1]
        entropy_sum, prob_sum = dino_teacher_entropies(targets)
        stats = torch.cat([teacher.float().sum(dim=0), prob_sum, entropy_sum.view(1)])
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = teacher.shape[0] * world
        batch_center = stats[:out_dim] / count
        m = self.cfg.dino.center_momentum
        self.center.mul_(m).add_(batch_center.unsqueeze(0) * (1 - m))
        self.last_teacher_entropy = stats[-1] / count
        self.last_teacher_mean_entropy = torch.special.entr(stats[out_dim:2 * out_dim] / count).sum()

    # ------------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> Tensor:
        crops = crops_of(batch)
        it, epoch = self.global_step, self.current_epoch
        self._iteration = it
        weight_decay = self.weight_decay_at(it)
        if self._trainer is not None and self.trainer.optimizers:
            # official: only the first (regularised) group's decay follows the schedule
            self.trainer.optimizers[0].param_groups[0]["weight_decay"] = weight_decay
        loss, teacher, targets = self.losses(crops, epoch)
        self.update_center(teacher, targets)
        batch_size = crops[0].shape[0]
        # Through StepMetrics (utils/step_logging.py): Lightning's log only on the steps whose values are written.
        m = self.train_metrics
        m.add("train/loss", loss, prog_bar=True)
        m.add("train/teacher_entropy", self.last_teacher_entropy, on_epoch=False)
        m.add("train/teacher_mean_entropy", self.last_teacher_mean_entropy, on_epoch=False)
        m.commit(self, batch_size, batch_idx)
        if is_logging_step(self._trainer):  # host-side schedule values: nothing to accumulate
            self.log_dict({"dino/teacher_momentum": self.teacher_momentum_at(it),
                           "dino/teacher_temp": self.teacher_temp_at(epoch), "optim/weight_decay": weight_decay},
                          on_step=True, on_epoch=False, batch_size=batch_size)
        self.record_nonfinite(loss)
        return loss

    def student_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.head.parameters()]

    def teacher_parameters(self) -> list[nn.Parameter]:
        return [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Called after backward (and after unscaling under fp16), before the optimiser step, as the official
        # clip_gradients + cancel_gradients_last_layer. --trainer.gradient_clip_val (global norm, off by
        # default) comes first when set.
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        d = self.cfg.dino
        if d.clip_grad > 0:
            clip_gradients_per_parameter(self.student_parameters(), d.clip_grad)
        if self.current_epoch < d.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The teacher's EMA belongs to the step: done here, before any on_train_batch_end hook (a step
        # checkpoint written there holds the teacher of this step).
        self.update_teacher(self.teacher_momentum_at(self._iteration))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← m · teacher + (1 − m) · student, parameter by parameter (the official arithmetic:
        ``param_k.mul_(m).add_((1 - m) * param_q)``)."""
        teacher, student = self.teacher_parameters(), self.student_parameters()
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1 - momentum))

    # ------------------------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx: int) -> Tensor:
        crops = crops_of(batch)
        loss, _, _ = self.losses(crops, self.current_epoch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=crops[0].shape[0])
        return loss

    # ------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        """The student's parameters (the teacher's have requires_grad=False) in the official two groups:
        weights (weight decay on the dino schedule) and biases / norms (no decay); the official lr schedule."""
        trainer = self.trainer
        optimizer = optimizer_from_groups(self.param_groups(), self.cfg.optim, self.lr)
        self.schedule_steps = max(1, int(trainer.estimated_stepping_batches))
        batches = trainer.num_training_batches
        steps_per_epoch = max(1, int(batches)) if batches != float("inf") else self.schedule_steps
        warmup_steps = min(self.schedule_steps, round(self.cfg.optim.warmup_epochs * steps_per_epoch))
        log_effective_lr(trainer, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor_at(step, warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ------------------------------------------------------------------------------------------- task
def check_config(cfg: Hparams) -> Optional[str]:
    """What --task=dino cannot train, in one line naming the flag (pass 2 of config/validation.py)."""
    if cfg.barlow.micro_batch_size:
        return ("--barlow.micro_batch_size applies to --task=barlow_twins; DINO's micro-batching is "
                "--dino.micro_batch_size")
    if cfg.barlow.dense_weight > 0:
        return "--barlow.dense_weight is a Barlow Twins term (--task=barlow_twins); DINO has none: leave it at 0"
    if cfg.dino.micro_batch_size < 0:
        return f"--dino.micro_batch_size must be >= 0 (0 = off), got {cfg.dino.micro_batch_size}"
    try:
        check_backbone_name(cfg.backbone.name)
    except UnknownNameError:
        return None  # the backbone check names the valid ones
    if not is_vit(cfg.backbone.name) and backbone_kind(cfg.backbone.name) != "cnn":
        return (f"--task=dino trains ViTs (vit, any timm ViT name) and resnet50, not --backbone.name="
                f"{cfg.backbone.name}")
    return multicrop_problem(cfg, input_granularity(cfg.backbone))


def local_crop_size(cfg: Hparams) -> int:
    """The side of the local crops of a DINO run, in pixels (dino.local_crop_size, or the automatic size)."""
    return resolve_local_size(cfg.data.img_size, cfg.dino, input_granularity(cfg.backbone))


def dino_datamodule(cfg: Hparams) -> DinoDataModule:
    return DinoDataModule(cfg.data, cfg.aug, cfg.dino, cfg.seed, granularity=input_granularity(cfg.backbone))


TASKS.register("dino")(
    Task(
        module=DinoModule,
        datamodule=dino_datamodule,
        monitor="val/loss",
        mode="min",
        pretraining=True,
        views=2,
        diagnostic="teacher_entropy",
        report=("val/loss", "final"),
        metrics=("train/loss_step", "train/loss_epoch", "val/loss", "train/teacher_entropy",
                 "train/teacher_mean_entropy", "dino/teacher_momentum", "dino/teacher_temp", "optim/weight_decay"),
        check_config=check_config,
    )
)
