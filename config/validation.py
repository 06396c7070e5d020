"""Checks of a parsed config that run before any data or model is touched.

Each failure is a :class:`ConfigError` whose one-line message names the flag and what would be valid.

Two passes, so that a mistyped value is reported in a fraction of a second: :func:`validate_values`
is plain Python (ranges, choices, files; it imports nothing heavier than the config itself), and
:func:`validate_components` runs after it, importing torch, timm and Lightning for what needs them
(registered names, a named timm model's architecture, visible GPUs).

Pass 2 asks each chosen component its own check — the task's, backbone's and head's registry entries
(``check_config``, and what a head says it supports), the dataset source's ``check``, the callbacks group's
``callbacks.checks.check_config`` — and itself holds only the rules that join groups (a head against the
backbone's depth, the augmentation against the input size, the devices). Adding a component never means
editing this file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional

from config.hparams import Hparams
from config.loading import ConfigError
from config.run_names import run_name_problem
from utils.registry import UnknownNameError

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "ddp_notebook")
VIT_ONLY_FIELDS = ("depth", "embed_dim", "num_heads", "patch_size")
SEED_MAX = 2**32 - 1  # numpy's seeds, and so Lightning's seed_everything, are 32-bit unsigned
INT_MAX = 2**63 - 1  # torch and numpy take integers as 64-bit signed; larger ones end in an OverflowError
MAX_LR = 1000.0
"""Largest peak learning rate (after --optim.lr_scaling, and times --optim.bias_lr_scale for the 1-D parameters).
An AdamW step moves every weight by about the rate (Adam normalises the gradient: the first step is ±lr), a LARS
step by rate × lars_eta of the weight's norm, which is the whole norm at 1000 with the default eta 0.001: above
this no setting of either optimiser trains, and far above it (1e38 and up, divided by 1 − beta1 in AdamW's first
step) the optimiser's float32 arithmetic overflows with a traceback. Divergence below the bound is caught by the
finite-loss check (one line, exit 1)."""
WORKER_TIMEOUT_MAX = 1_000_000.0  # seconds (11.6 days); the worker queue's poll overflows above 2**31 ms (24.8 days)


def _positive(value: float, flag: str) -> None:
    if not value > 0:
        raise ConfigError(f"{flag} must be > 0, got {value}")


def _probability(value: float, flag: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} must be a probability in [0, 1], got {value}")


def _rate(value: float, flag: str) -> None:
    """A learning rate the optimiser gets as it is (no scaling): > 0 and at most :data:`MAX_LR`."""
    _positive(value, flag)
    if value > MAX_LR:
        raise ConfigError(f"{flag} must be at most {MAX_LR:g} (a step moves each weight by about the rate), got {value:g}")


def _decay(value: float, flag: str) -> None:
    """A momentum or moving-average coefficient: in [0, 1) (1 would never forget, or divide by 0)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag} must be in [0, 1), got {value}")


def _raise_problem(problem: Optional[str]) -> None:
    """A component's own check answered with a one-line problem (or None: nothing wrong)."""
    if problem:
        raise ConfigError(problem)


def _registered(registry, name: str, flag: str) -> None:
    if name not in registry:
        raise ConfigError(f"{flag}: {UnknownNameError(registry.kind, name, registry.names())}")


def _check_architecture(cfg: Hparams, arch: Mapping[str, int]) -> None:
    """Width/heads and input/patch size consistency of the keys present in ``arch`` (a ViT's
    depth / embed_dim / num_heads / patch_size, complete or only the overrides given)."""
    if "embed_dim" in arch and "num_heads" in arch and arch["embed_dim"] % arch["num_heads"]:
        raise ConfigError(
            f"--backbone.embed_dim={arch['embed_dim']} is not divisible by --backbone.num_heads={arch['num_heads']}"
            f" (e.g. num_heads in {[h for h in range(1, 17) if arch['embed_dim'] % h == 0]})"
        )
    if "patch_size" in arch and cfg.data.img_size > 0 and cfg.data.img_size % arch["patch_size"]:
        p = arch["patch_size"]
        lower, upper = cfg.data.img_size // p * p, (cfg.data.img_size // p + 1) * p
        raise ConfigError(
            f"--data.img_size={cfg.data.img_size} is not a multiple of the patch size {p} "
            f"(--backbone.patch_size); e.g. {lower or upper} or {upper}"
        )


# ---------------------------------------------------------------- pass 1: plain Python
def _integer_fields(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _integer_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}{f.name}", value


def run_values(cfg: Hparams) -> None:
    """The seed, the run name, and integers of any field small enough for torch and numpy."""
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"--seed must be in [0, {SEED_MAX}] (numpy's 32-bit seeds), got {cfg.seed}")
    for name, value in _integer_fields(cfg):
        if abs(value) > INT_MAX:
            raise ConfigError(f"--{name} must be a 64-bit integer (at most {INT_MAX} in size), got {value}")
    _raise_problem(run_name_problem(cfg.log.run_name, cfg.log.output_dir))


def backbone_values(cfg: Hparams) -> None:
    b = cfg.backbone
    for name in VIT_ONLY_FIELDS:
        value = getattr(b, name)
        if value < 0:
            raise ConfigError(f"--backbone.{name} must be > 0 (or 0 for the named model's value), got {value}")
    # The overrides alone already decide these for every timm ViT name ('pixels' derives its own widths,
    # other backbones refuse the overrides in pass 2).
    if b.name == "vit" or b.name.startswith("vit_"):
        _check_architecture(cfg, {name: getattr(b, name) for name in VIT_ONLY_FIELDS if getattr(b, name)})
    if b.pretrained and b.name == "vit":
        raise ConfigError("--backbone.pretrained needs a named model with published weights (e.g. "
                          "--backbone.name=vit_small_patch16_224.dino), not the generic 'vit'")
    if b.pretrained and b.weights:
        raise ConfigError("--backbone.pretrained and --backbone.weights both set: choose one source of weights")
    if not 0 <= b.drop_path_rate < 1:
        raise ConfigError(f"--backbone.drop_path_rate must be in [0, 1), got {b.drop_path_rate}")
    if b.weights and not Path(b.weights).is_file():
        raise ConfigError(f"--backbone.weights: file {b.weights!r} does not exist")
    if b.name == "pixels" and cfg.task != "segmentation":
        raise ConfigError("--backbone.name=pixels (raw pixel patches, nothing to train) is a floor for segmentation "
                          "probes (--task=segmentation), not a backbone to pretrain")
    if b.resnet_norm != "batch" and b.name != "resnet50":
        raise ConfigError(f"--backbone.resnet_norm applies to resnet50 only, not {b.name!r}; leave it at 'batch'")
    if b.resnet_norm == "group" and b.pretrained:
        raise ConfigError("--backbone.resnet_norm=group cannot load the BatchNorm ImageNet weights of "
                          "--backbone.pretrained; use resnet_norm=batch or frozen")


def data_values(cfg: Hparams) -> None:
    d = cfg.data
    _positive(d.batch_size, "--data.batch_size")
    if d.batch_size < 2:
        raise ConfigError(f"--data.batch_size must be >= 2 (the loss standardises over the batch), got {d.batch_size}")
    _positive(d.img_size, "--data.img_size")
    if d.val_max_images < 0:
        raise ConfigError(f"--data.val_max_images must be >= 0 (0 = all), got {d.val_max_images}")
    if d.num_workers < -1:
        raise ConfigError(f"--data.num_workers must be -1 (auto: min(8, CPU count)), 0 (load in the training "
                          f"process) or a number of worker processes, got {d.num_workers}")
    if d.worker_timeout > WORKER_TIMEOUT_MAX:
        raise ConfigError(f"--data.worker_timeout must be at most {WORKER_TIMEOUT_MAX:g} seconds (0 = wait forever), "
                          f"got {d.worker_timeout:g}")
    if d.worker_timeout < 0:
        raise ConfigError(f"--data.worker_timeout must be >= 0 seconds (0 = wait forever), got {d.worker_timeout}")


def augment_values(cfg: Hparams) -> None:
    a = cfg.aug
    for name in ("hflip_prob", "jitter_prob", "grayscale_prob", "blur_prob_1", "blur_prob_2",
                 "solarize_prob_1", "solarize_prob_2"):
        _probability(getattr(a, name), f"--aug.{name}")
    if not 0 < a.crop_scale_min <= a.crop_scale_max <= 1:
        raise ConfigError(f"--aug.crop_scale_min/max must satisfy 0 < min <= max <= 1, got "
                          f"{a.crop_scale_min} and {a.crop_scale_max}")
    for name in ("brightness", "contrast", "saturation"):
        if getattr(a, name) < 0:
            raise ConfigError(f"--aug.{name} must be >= 0, got {getattr(a, name)}")
        # the factor is drawn from [max(0, 1 − s), 1 + s]: at 100 nearly every draw already saturates the image,
        # and far above (1e39) torch cannot draw it in float32 (a traceback at the first batch)
        if getattr(a, name) > 100:
            raise ConfigError(f"--aug.{name} must be at most 100 (ColorJitter draws its factor from [max(0, 1 − s), "
                              f"1 + s]), got {getattr(a, name):g}")
    if not 0 <= a.hue <= 0.5:
        raise ConfigError(f"--aug.hue must be in [0, 0.5], got {a.hue}")
    if not 0 < a.blur_sigma_min <= a.blur_sigma_max:
        raise ConfigError(f"--aug.blur_sigma_min/max must satisfy 0 < min <= max, got {a.blur_sigma_min} and {a.blur_sigma_max}")
    if a.blur_kernel_size and (a.blur_kernel_size < 3 or a.blur_kernel_size % 2 == 0):
        raise ConfigError(f"--aug.blur_kernel_size must be odd and >= 3 (or 0 = auto), got {a.blur_kernel_size}")
    if a.gpu and a.device not in ("cpu", "gpu_photometric"):
        raise ConfigError(f"--aug.gpu=true (the older name of --aug.device gpu_photometric) contradicts "
                          f"--aug.device {a.device}; drop --aug.gpu")


def training_values(cfg: Hparams) -> None:
    _positive(cfg.barlow.proj_dim, "--barlow.proj_dim")
    _positive(cfg.barlow.proj_layers, "--barlow.proj_layers")
    if cfg.barlow.lambd < 0:
        raise ConfigError(f"--barlow.lambd must be >= 0, got {cfg.barlow.lambd}")
    if cfg.barlow.micro_batch_size < 0:
        raise ConfigError(f"--barlow.micro_batch_size must be >= 0 (0 = off), got {cfg.barlow.micro_batch_size}")
    if cfg.barlow.dense_weight < 0:
        raise ConfigError(f"--barlow.dense_weight must be >= 0 (0 = off), got {cfg.barlow.dense_weight}")
    if cfg.barlow.dense_weight > 0 and cfg.task == "barlow_twins":
        _positive(cfg.barlow.dense_proj_dim, "--barlow.dense_proj_dim")
        if cfg.barlow.dense_points < 1 or cfg.barlow.dense_points * cfg.data.batch_size < 2:
            raise ConfigError(f"--barlow.dense_points must be >= 1 with at least 2 points per batch, got "
                              f"{cfg.barlow.dense_points} × batch {cfg.data.batch_size}")
    o = cfg.optim
    _positive(o.lr, "--optim.lr")
    if o.weight_decay < 0:
        raise ConfigError(f"--optim.weight_decay must be >= 0, got {o.weight_decay}")
    optimiser_values(cfg)
    if o.warmup_epochs < 0:
        raise ConfigError(f"--optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"--optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _positive(o.bias_lr_scale, "--optim.bias_lr_scale")
    t = cfg.trainer
    if o.lr_scaling == "linear" and (t.tune_lr or t.tune_batch_size):
        raise ConfigError("--optim.lr_scaling=linear scales optim.lr by the batch fixed at start; the tuners change "
                          "the rate (tune_lr) or the batch (tune_batch_size) afterwards: tune with lr_scaling=none")
    if t.max_steps == -1:
        _positive(t.max_epochs, "--trainer.max_epochs")
    elif t.max_steps <= 0:
        raise ConfigError(f"--trainer.max_steps must be > 0 or -1 (no limit), got {t.max_steps}")
    elif t.max_epochs <= 0 and t.max_epochs != -1:
        raise ConfigError(f"--trainer.max_epochs must be > 0 or -1 (no limit), got {t.max_epochs}")
    _positive(t.devices, "--trainer.devices")
    _positive(t.num_nodes, "--trainer.num_nodes")
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"--trainer.strategy: {t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if t.sync_batchnorm and t.accelerator == "cpu":
        raise ConfigError("--trainer.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm has no CPU "
                          "implementation); the projector normalises over the global batch without it")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"--trainer.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if t.accelerator not in ACCELERATORS:
        raise ConfigError(f"--trainer.accelerator: {t.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if t.gradient_clip_val < 0:
        raise ConfigError(f"--trainer.gradient_clip_val must be >= 0 (0 = off), got {t.gradient_clip_val}")
    _positive(t.limit_train_batches, "--trainer.limit_train_batches")
    if t.limit_val_batches < 0:
        raise ConfigError(f"--trainer.limit_val_batches must be >= 0, got {t.limit_val_batches}")
    for name in ("check_val_every_n_epoch", "log_every_n_steps", "finite_check_every_n_steps", "progress_refresh_rate"):
        _positive(getattr(t, name), f"--trainer.{name}")
    if t.checkpoint_every_n_steps < 0:
        raise ConfigError(f"--trainer.checkpoint_every_n_steps must be >= 0 (0 = off), got {t.checkpoint_every_n_steps}")
    if t.tune_batch_size or t.tune_lr:
        if t.resume:
            raise ConfigError("--trainer.tune_batch_size/tune_lr apply to new runs; a resumed run keeps the values "
                              "in its config.yaml (drop the tune flags, or start a new run)")
        if t.devices != 1:
            raise ConfigError("--trainer.tune_batch_size/tune_lr need --trainer.devices=1 (Lightning's tuner refuses "
                              "distributed runs): tune on one device, then train on several with the values found")
    if t.tune_batch_size_max < 2:
        raise ConfigError(f"--trainer.tune_batch_size_max must be >= 2, got {t.tune_batch_size_max}")
    _positive(t.tune_batch_size_trials, "--trainer.tune_batch_size_trials")
    if not 0 < t.tune_lr_min < t.tune_lr_max:
        raise ConfigError(f"--trainer.tune_lr_min/max must satisfy 0 < min < max, got {t.tune_lr_min} and {t.tune_lr_max}")
    _rate(t.tune_lr_max, "--trainer.tune_lr_max")
    for name in ("limit_train_batches", "limit_val_batches"):
        value = getattr(t, name)
        if value > 1 and not float(value).is_integer():
            raise ConfigError(f"--trainer.{name} must be a fraction <= 1.0 or a whole number of batches, got {value} "
                              f"(Lightning would silently use {int(value)} batches)")
    if t.tune_lr_steps < 20:
        raise ConfigError(f"--trainer.tune_lr_steps must be >= 20 (fewer losses cannot tell a trend from batch noise; "
                          f"the suggestion would be refused), got {t.tune_lr_steps}")
    if t.resume and t.resume != "auto" and not Path(t.resume).exists():
        raise ConfigError(f"--trainer.resume: checkpoint {t.resume!r} does not exist (give a .ckpt file, a run directory, or 'auto')")


def optimiser_values(cfg: Hparams) -> None:
    """The optimiser's coefficients and the peak learning rate it gets (see :data:`MAX_LR`)."""
    o = cfg.optim
    _decay(o.beta1, "--optim.beta1")
    _decay(o.beta2, "--optim.beta2")
    _decay(o.momentum, "--optim.momentum")
    _positive(o.lars_eta, "--optim.lars_eta")
    # utils.optim.effective_lr, without importing torch (pass 1)
    batch = cfg.data.batch_size * max(1, cfg.trainer.devices) * max(1, cfg.trainer.num_nodes)
    scaled = o.lr_scaling == "linear"
    peak = o.lr * (batch / 256 if scaled else 1.0)
    how = f" ({o.lr:g} × global batch {batch} / 256, --optim.lr_scaling linear)" if scaled else ""
    if peak > MAX_LR:
        raise ConfigError(f"--optim.lr={o.lr:g} gives a peak learning rate of {peak:g}{how}; valid: at most "
                          f"{MAX_LR:g} (a step moves each weight by about the rate; far above, the optimiser overflows)")
    if o.exclude_1d_from_decay and peak * o.bias_lr_scale > MAX_LR:
        raise ConfigError(f"--optim.bias_lr_scale={o.bias_lr_scale:g} gives the 1-D parameters a peak learning rate of "
                          f"{peak * o.bias_lr_scale:g} (peak {peak:g} × scale); valid: at most {MAX_LR:g}")
    # AdamW multiplies every weight by 1 − lr × weight_decay each step (decoupled decay): above 1 it flips their
    # signs. LARS adds weight_decay × w to the gradient; the same bound keeps it far from overflowing.
    decays = [("--optim.weight_decay", o.weight_decay)]
    if cfg.task == "dino":
        decays.append(("--dino.weight_decay_end", cfg.dino.weight_decay_end))
    for flag, decay in decays:
        if peak * decay > 1:
            raise ConfigError(f"{flag}={decay:g} × the peak learning rate {peak:g} must be at most 1 (each step "
                              f"multiplies the weights by 1 − lr × weight decay); use at most {1 / peak:g}")


def segmentation_values(cfg: Hparams) -> None:
    s = cfg.segmentation
    if s.num_classes < 2:
        raise ConfigError(f"--segmentation.num_classes must be >= 2, got {s.num_classes}")
    _positive(s.hidden_dim, "--segmentation.hidden_dim")
    _rate(s.backbone_lr, "--segmentation.backbone_lr")
    if not 0 <= s.classifier_dropout < 1:
        raise ConfigError(f"--segmentation.classifier_dropout must be in [0, 1), got {s.classifier_dropout}")
    _positive(s.log_per_class_every_n_epochs, "--segmentation.log_per_class_every_n_epochs")
    if not 0 < s.crop_scale_min <= 1:
        raise ConfigError(f"--segmentation.crop_scale_min must be in (0, 1], got {s.crop_scale_min}")
    _probability(s.hflip_prob, "--segmentation.hflip_prob")
    if s.aux_weight < 0 or s.focal_gamma < 0:
        raise ConfigError("--segmentation.aux_weight and --segmentation.focal_gamma must be >= 0")
    if s.pretrained_head and s.num_classes != 21:
        raise ConfigError("--segmentation.pretrained_head: the COCO DeepLabV3 predicts VOC's 21 classes; "
                          f"--segmentation.num_classes is {s.num_classes}")
    if s.class_weighting != "none" and s.loss == "dice":
        raise ConfigError("--segmentation.class_weighting applies to the ce and focal losses (Dice is balanced already)")
    if s.head_weights and not Path(s.head_weights).is_file():
        raise ConfigError(f"--segmentation.head_weights: file {s.head_weights!r} does not exist")


def dino_values(cfg: Hparams) -> None:
    """DINO's own settings (task=dino)."""
    d = cfg.dino
    for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
        _positive(getattr(d, name), f"--dino.{name}")
    for name in ("momentum_teacher", "center_momentum"):
        if not 0 <= getattr(d, name) <= 1:
            raise ConfigError(f"--dino.{name} must be in [0, 1], got {getattr(d, name)}")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _positive(getattr(d, name), f"--dino.{name}")
    for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs", "local_crops_number", "local_crop_size"):
        if getattr(d, name) < 0:
            raise ConfigError(f"--dino.{name} must be >= 0, got {getattr(d, name)}")
    if d.weight_decay_end < 0:
        raise ConfigError(f"--dino.weight_decay_end must be >= 0, got {d.weight_decay_end}")
    if d.clip_grad < 0:
        raise ConfigError(f"--dino.clip_grad must be >= 0 (0 = off), got {d.clip_grad}")
    if not 0 < d.local_crops_scale_min <= d.local_crops_scale_max <= 1:
        raise ConfigError(f"--dino.local_crops_scale_min/max must satisfy 0 < min <= max <= 1, got "
                          f"{d.local_crops_scale_min} and {d.local_crops_scale_max}")
    _probability(d.local_blur_prob, "--dino.local_blur_prob")


def callback_values(cfg: Hparams) -> None:
    c = cfg.callbacks
    _positive(c.every_n_epochs, "--callbacks.every_n_epochs")
    _positive(c.num_images, "--callbacks.num_images")
    _positive(c.erf_images, "--callbacks.erf_images")
    if not 0 < c.attention_keep <= 1:
        raise ConfigError(f"--callbacks.attention_keep must be in (0, 1], got {c.attention_keep}")
    if c.cross_correlation_block < 0:
        raise ConfigError(f"--callbacks.cross_correlation_block must be >= 0 (0 = off), got {c.cross_correlation_block}")
    _positive(c.emergence_images, "--callbacks.emergence_images")
    _positive(c.emergence_img_size, "--callbacks.emergence_img_size")
    _positive(c.emergence_every_n_epochs, "--callbacks.emergence_every_n_epochs")
    _positive(c.online_probe_every_n_epochs, "--callbacks.online_probe_every_n_epochs")
    _rate(c.online_probe_lr, "--callbacks.online_probe_lr")
    _positive(c.online_probe_batch_size, "--callbacks.online_probe_batch_size")


def validate_values(cfg: Hparams) -> None:
    """Pass 1: every check that needs no torch, timm or Lightning (no heavy import happens here)."""
    run_values(cfg)
    backbone_values(cfg)
    data_values(cfg)
    augment_values(cfg)
    training_values(cfg)
    if cfg.task == "segmentation":
        segmentation_values(cfg)
    if cfg.task == "dino":
        dino_values(cfg)
    callback_values(cfg)
    if not cfg.log.output_dir:
        raise ConfigError("--log.output_dir must not be empty")


# ---------------------------------------------------------------- pass 2: registries, models, devices
# The imports inside the pass-2 functions are local on purpose: pass 1 must report a mistyped value without
# importing torch, timm or Lightning (main.py imports this module before either pass).
def backbone_components(cfg: Hparams) -> None:
    # local: pass 1 stays torch-free
    from models.backbones import check_backbone_config, check_backbone_name, is_vit, resolve_architecture

    b = cfg.backbone
    try:
        check_backbone_name(b.name)
    except UnknownNameError as err:
        raise ConfigError(f"--backbone.name: {err}") from None
    for name in VIT_ONLY_FIELDS:
        if getattr(b, name) and not is_vit(b.name):
            raise ConfigError(f"--backbone.{name} applies to ViT backbones only, not {b.name!r}; leave it at 0")
    if is_vit(b.name):
        _check_architecture(cfg, resolve_architecture(b))
    _raise_problem(check_backbone_config(cfg))


def device_components(cfg: Hparams) -> None:
    """The accelerator asked for exists here (Lightning would otherwise stop with a traceback)."""
    import torch

    t = cfg.trainer
    cuda = torch.cuda.is_available()
    if t.accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"--trainer.accelerator={t.accelerator}: no CUDA GPU is visible here "
                          f"(torch.cuda.is_available() is False); use auto (a GPU when there is one) or cpu")
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--trainer.accelerator=mps: Apple's Metal (MPS) backend is not available here; use auto or cpu")
    if t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and cuda):
        visible = torch.cuda.device_count()
        if t.devices > visible:
            raise ConfigError(f"--trainer.devices={t.devices}: only {visible} CUDA GPU(s) visible on this machine "
                              f"(--trainer.devices counts GPUs per node); use at most {visible}")
    if t.sync_batchnorm and not cuda:
        raise ConfigError("--trainer.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm has no CPU "
                          "implementation); the projector normalises over the global batch without it")


def segmentation_components(cfg: Hparams) -> None:
    """The head against the backbone (cross-group), then what the head's registry entry says about its own
    settings (``models.segmenters.head_settings_problem``)."""
    # local: pass 1 stays torch-free
    from models.backbones import is_vit, resolve_architecture
    from models.heads import head_levels
    from models.segmenters import DEEPLAB_HEAD, head_fits_backbone, head_settings_problem, segmentation_head_names

    s = cfg.segmentation
    if s.head not in segmentation_head_names():
        raise ConfigError(f"--segmentation.head: unknown head {s.head!r}; valid: {', '.join(segmentation_head_names())}")
    problem = head_fits_backbone(s.head, cfg.backbone.name)
    if problem:
        raise ConfigError(problem)
    if s.head != DEEPLAB_HEAD and is_vit(cfg.backbone.name):
        try:
            head_levels(s.head, resolve_architecture(cfg.backbone)["depth"], s)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _raise_problem(head_settings_problem(cfg))


def callback_components(cfg: Hparams) -> None:
    from callbacks.baselines import check_config as check_baselines  # local: pass 1 stays torch-free
    from callbacks.checks import check_config  # local: pass 1 stays torch-free

    _raise_problem(check_config(cfg))
    _raise_problem(check_baselines(cfg))


def data_components(cfg: Hparams) -> None:
    from datamodules import DATASETS  # local: pass 1 stays torch-free

    d = cfg.data
    _registered(DATASETS, d.dataset, "--data.dataset")
    _raise_problem(DATASETS.get(d.dataset).check(d))


FOLDER_ONLY_FIELDS = ("eval_root", "file_list", "subfolders", "index_dir", "skip_bad_images")


def labelled_data_components(cfg: Hparams) -> None:
    """A source without masks (the image folders of datamodules/folder.py) pretrains only, and the callbacks
    that measure against masks then need a labelled set of their own (--data.eval_root)."""
    # local: pass 1 stays torch-free
    from datamodules import DATASETS
    from lightningmodules import TASKS
    from models.backbones import is_vit

    d = cfg.data
    if getattr(DATASETS.get(d.dataset), "has_masks", True):
        for name in FOLDER_ONLY_FIELDS:
            if getattr(d, name):
                raise ConfigError(f"--data.{name} applies to the image-folder sources (--data.dataset folder or "
                                  f"imagenet), not --data.dataset={d.dataset}")
        return
    if not TASKS.get(cfg.task).pretraining:
        raise ConfigError(f"--data.dataset={d.dataset} has no masks: --task={cfg.task} needs a labelled set "
                          f"(--data.dataset voc or synthetic); image folders are for pretraining")
    c = cfg.callbacks
    needing = [flag for flag, on in (("--callbacks.emergence", c.emergence and is_vit(cfg.backbone.name)),
                                     ("--callbacks.online_probe", c.online_probe)) if on]
    if needing and not d.eval_root:
        raise ConfigError(f"{' and '.join(needing)} measure against VOC masks, which --data.dataset={d.dataset} "
                          f"does not have: give a labelled set with --data.eval_root DIR (a folder holding "
                          f"VOCdevkit/VOC2012), or set {' '.join(f + '=false' for f in needing)}")


def validate_components(cfg: Hparams) -> None:
    """Pass 2: the checks that need the registries, timm's model definitions or torch's device queries."""
    from lightningmodules import TASKS  # local: pass 1 stays torch-free

    _registered(TASKS, cfg.task, "--task")
    task_check = TASKS.get(cfg.task).check_config
    _raise_problem(task_check(cfg) if task_check is not None else None)
    backbone_components(cfg)
    device_components(cfg)
    if cfg.task == "segmentation":
        segmentation_components(cfg)
    callback_components(cfg)
    data_components(cfg)  # last: the only checks that look at the file system
    labelled_data_components(cfg)


def validate(cfg: Hparams) -> Hparams:
    """Both passes; returns ``cfg`` unchanged when it is valid."""
    validate_values(cfg)
    validate_components(cfg)
    return cfg
