"""Checks of a parsed config that run before any data or model is touched.

Each failure is a :class:`ConfigError` whose one-line message names the flag and what would be valid.
"""
from __future__ import annotations

from pathlib import Path

from config.hparams import Hparams
from config.loading import ConfigError
from utils.registry import UnknownNameError

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "ddp_notebook")
VIT_ONLY_FIELDS = ("depth", "embed_dim", "num_heads", "patch_size")


def _positive(value: float, flag: str) -> None:
    if not value > 0:
        raise ConfigError(f"{flag} must be > 0, got {value}")


def _probability(value: float, flag: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} must be a probability in [0, 1], got {value}")


def _registered(registry, name: str, flag: str) -> None:
    if name not in registry:
        raise ConfigError(f"{flag}: {UnknownNameError(registry.kind, name, registry.names())}")


def validate_backbone(cfg: Hparams) -> None:
    from models.backbones import check_backbone_name, is_vit
    from models.backbones.vit import resolve_architecture

    b = cfg.backbone
    try:
        check_backbone_name(b.name)
    except UnknownNameError as err:
        raise ConfigError(f"--backbone.name: {err}") from None
    for name in VIT_ONLY_FIELDS:
        value = getattr(b, name)
        if value < 0:
            raise ConfigError(f"--backbone.{name} must be > 0 (or 0 for the named model's value), got {value}")
        if value and not is_vit(b.name):
            raise ConfigError(f"--backbone.{name} applies to ViT backbones only, not {b.name!r}; leave it at 0")
    if is_vit(b.name):
        arch = resolve_architecture(b)
        if arch["embed_dim"] % arch["num_heads"]:
            raise ConfigError(
                f"--backbone.embed_dim={arch['embed_dim']} is not divisible by --backbone.num_heads={arch['num_heads']}"
                f" (e.g. num_heads in {[h for h in range(1, 17) if arch['embed_dim'] % h == 0]})"
            )
        if cfg.data.img_size % arch["patch_size"]:
            p = arch["patch_size"]
            lower, upper = cfg.data.img_size // p * p, (cfg.data.img_size // p + 1) * p
            raise ConfigError(
                f"--data.img_size={cfg.data.img_size} is not a multiple of the patch size {p} "
                f"(--backbone.patch_size); e.g. {lower or upper} or {upper}"
            )
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


def validate_data(cfg: Hparams) -> None:
    from datamodules import DATASETS

    d = cfg.data
    _registered(DATASETS, d.dataset, "--data.dataset")
    _positive(d.batch_size, "--data.batch_size")
    if d.batch_size < 2:
        raise ConfigError(f"--data.batch_size must be >= 2 (the loss standardises over the batch), got {d.batch_size}")
    _positive(d.img_size, "--data.img_size")
    if d.val_max_images < 0:
        raise ConfigError(f"--data.val_max_images must be >= 0 (0 = all), got {d.val_max_images}")
    problem = DATASETS.get(d.dataset).check(d)
    if problem:
        raise ConfigError(problem)


def validate_augment(cfg: Hparams) -> None:
    from datamodules.transforms import blur_kernel_size

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
    if not 0 <= a.hue <= 0.5:
        raise ConfigError(f"--aug.hue must be in [0, 0.5], got {a.hue}")
    if not 0 < a.blur_sigma_min <= a.blur_sigma_max:
        raise ConfigError(f"--aug.blur_sigma_min/max must satisfy 0 < min <= max, got {a.blur_sigma_min} and {a.blur_sigma_max}")
    if a.blur_kernel_size and (a.blur_kernel_size < 3 or a.blur_kernel_size % 2 == 0):
        raise ConfigError(f"--aug.blur_kernel_size must be odd and >= 3 (or 0 = auto), got {a.blur_kernel_size}")
    # Both augmentation modes blur the img_size² Barlow Twins view with reflect padding, which must be
    # narrower than the view.
    kernel = blur_kernel_size(a)
    if cfg.task == "barlow_twins" and 0 < cfg.data.img_size <= kernel // 2:
        source = "--aug.blur_kernel_size" if a.blur_kernel_size else "the kernel implied by --aug.blur_sigma_max"
        raise ConfigError(f"{source} ({kernel} px) needs {kernel // 2} px of reflect padding, which must be less "
                          f"than --data.img_size={cfg.data.img_size}; use a kernel of at most {2 * cfg.data.img_size - 1}")


def validate_training(cfg: Hparams) -> None:
    _positive(cfg.barlow.proj_dim, "--barlow.proj_dim")
    _positive(cfg.barlow.proj_layers, "--barlow.proj_layers")
    if cfg.barlow.lambd < 0:
        raise ConfigError(f"--barlow.lambd must be >= 0, got {cfg.barlow.lambd}")
    if cfg.barlow.micro_batch_size < 0:
        raise ConfigError(f"--barlow.micro_batch_size must be >= 0 (0 = off), got {cfg.barlow.micro_batch_size}")
    if cfg.barlow.dense_weight < 0:
        raise ConfigError(f"--barlow.dense_weight must be >= 0 (0 = off), got {cfg.barlow.dense_weight}")
    if cfg.barlow.dense_weight > 0 and cfg.task == "barlow_twins":
        from models.backbones import is_vit

        if not is_vit(cfg.backbone.name):
            raise ConfigError(f"--barlow.dense_weight needs a ViT backbone (it matches patch tokens); "
                              f"--backbone.name={cfg.backbone.name} has none")
        _positive(cfg.barlow.dense_proj_dim, "--barlow.dense_proj_dim")
        if cfg.barlow.dense_points < 1 or cfg.barlow.dense_points * cfg.data.batch_size < 2:
            raise ConfigError(f"--barlow.dense_points must be >= 1 with at least 2 points per batch, got "
                              f"{cfg.barlow.dense_points} × batch {cfg.data.batch_size}")
    o = cfg.optim
    _positive(o.lr, "--optim.lr")
    if o.weight_decay < 0:
        raise ConfigError(f"--optim.weight_decay must be >= 0, got {o.weight_decay}")
    if o.warmup_epochs < 0:
        raise ConfigError(f"--optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"--optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _positive(o.bias_lr_scale, "--optim.bias_lr_scale")
    t = cfg.trainer
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
    if t.sync_batchnorm:
        import torch

        if t.accelerator == "cpu" or not torch.cuda.is_available():
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
    if t.tune_lr_steps < 13:
        raise ConfigError(f"--trainer.tune_lr_steps must be >= 13 (the LR finder needs 13 finite losses), got {t.tune_lr_steps}")
    if t.resume and t.resume != "auto" and not Path(t.resume).exists():
        raise ConfigError(f"--trainer.resume: checkpoint {t.resume!r} does not exist (give a .ckpt file, a run directory, or 'auto')")


def validate_segmentation(cfg: Hparams) -> None:
    from models.backbones import is_vit
    from models.backbones.vit import resolve_architecture
    from models.heads import head_levels
    from models.segmenters import DEEPLAB_HEAD, head_fits_backbone, segmentation_head_names

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
    if s.head == "attn_fusion" and cfg.backbone.name == "pixels":
        raise ConfigError("--segmentation.head=attn_fusion fuses the backbone's attention, and "
                          "--backbone.name=pixels (raw pixel patches) has none; use linear, setr_naive or setr_pup")
    if s.num_classes < 2:
        raise ConfigError(f"--segmentation.num_classes must be >= 2, got {s.num_classes}")
    _positive(s.hidden_dim, "--segmentation.hidden_dim")
    _positive(s.backbone_lr, "--segmentation.backbone_lr")
    _positive(s.log_per_class_every_n_epochs, "--segmentation.log_per_class_every_n_epochs")
    if not 0 < s.crop_scale_min <= 1:
        raise ConfigError(f"--segmentation.crop_scale_min must be in (0, 1], got {s.crop_scale_min}")
    _probability(s.hflip_prob, "--segmentation.hflip_prob")
    if s.aux_weight < 0 or s.focal_gamma < 0:
        raise ConfigError("--segmentation.aux_weight and --segmentation.focal_gamma must be >= 0")
    for flag, on in (("pretrained_head", s.pretrained_head), ("aux_loss", s.aux_loss)):
        if on and s.head != DEEPLAB_HEAD:
            raise ConfigError(f"--segmentation.{flag} applies to --segmentation.head={DEEPLAB_HEAD} only")
    if s.pretrained_head and s.num_classes != 21:
        raise ConfigError("--segmentation.pretrained_head: the COCO DeepLabV3 predicts VOC's 21 classes; "
                          f"--segmentation.num_classes is {s.num_classes}")
    if s.class_weighting != "none" and s.loss == "dice":
        raise ConfigError("--segmentation.class_weighting applies to the ce and focal losses (Dice is balanced already)")
    if s.head_weights and not Path(s.head_weights).is_file():
        raise ConfigError(f"--segmentation.head_weights: file {s.head_weights!r} does not exist")


def validate_callbacks(cfg: Hparams) -> None:
    from callbacks.visual import parse_indices
    from models.backbones import is_vit
    from models.backbones.vit import resolve_architecture

    c = cfg.callbacks
    _positive(c.every_n_epochs, "--callbacks.every_n_epochs")
    _positive(c.num_images, "--callbacks.num_images")
    if not 0 < c.attention_keep <= 1:
        raise ConfigError(f"--callbacks.attention_keep must be in (0, 1], got {c.attention_keep}")
    if c.cross_correlation_block < 0:
        raise ConfigError(f"--callbacks.cross_correlation_block must be >= 0 (0 = off), got {c.cross_correlation_block}")
    try:
        blocks = parse_indices(c.attention_blocks, "--callbacks.attention_blocks")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if c.attention and blocks and is_vit(cfg.backbone.name):
        depth = resolve_architecture(cfg.backbone)["depth"]
        bad = [b for b in blocks if not -depth <= b < depth]
        if bad:
            raise ConfigError(f"--callbacks.attention_blocks: block(s) {bad} out of range for a {depth}-block ViT "
                              f"(valid: 0..{depth - 1}, or negative from the end)")
    _positive(c.emergence_images, "--callbacks.emergence_images")
    _positive(c.emergence_every_n_epochs, "--callbacks.emergence_every_n_epochs")
    _positive(c.online_probe_every_n_epochs, "--callbacks.online_probe_every_n_epochs")
    _positive(c.online_probe_lr, "--callbacks.online_probe_lr")
    _positive(c.online_probe_batch_size, "--callbacks.online_probe_batch_size")
    # Asked for explicitly (it is off by default), so a backbone it cannot probe is an error, not a warning.
    if c.online_probe and cfg.task == "barlow_twins" and not is_vit(cfg.backbone.name):
        raise ConfigError(f"--callbacks.online_probe needs a ViT backbone (it trains a linear head on patch "
                          f"tokens); --backbone.name={cfg.backbone.name} is a CNN")
    if c.erf:
        from callbacks.receptive_field import check_erf_layers

        problem = check_erf_layers(cfg)
        if problem:
            raise ConfigError(problem)


def validate(cfg: Hparams) -> Hparams:
    from lightningmodules import TASKS

    _registered(TASKS, cfg.task, "--task")
    validate_backbone(cfg)
    validate_augment(cfg)
    validate_training(cfg)
    if cfg.task == "segmentation":
        validate_segmentation(cfg)
    validate_callbacks(cfg)
    validate_data(cfg)  # last: the only check that looks at the file system
    if not cfg.log.output_dir:
        raise ConfigError("--log.output_dir must not be empty")
    return cfg
