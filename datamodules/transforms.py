"""The two-view Barlow Twins augmentation (official asymmetric recipe), torchvision transforms v2."""
from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from config.hparams import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def blur_kernel_size(cfg: AugmentConfig) -> int:
    """The configured kernel, or the smallest odd one covering ±3 sigma_max."""
    if cfg.blur_kernel_size:
        return cfg.blur_kernel_size
    return 2 * math.ceil(3 * cfg.blur_sigma_max) + 1


def view_transform(cfg: AugmentConfig, img_size: int, blur_prob: float, solarize_prob: float) -> v2.Compose:
    """One view's pipeline on a uint8 (3, H, W) tensor → normalised float32 (3, img_size, img_size).

    Crop first, so every later operation runs on img_size² pixels; the photometric operations run on
    uint8 as the PIL pipeline of the official code does (solarisation threshold 128).
    """
    return v2.Compose([
        v2.RandomResizedCrop(
            img_size,
            scale=(cfg.crop_scale_min, cfg.crop_scale_max),
            interpolation=_INTERPOLATION[cfg.crop_interpolation],
            antialias=True,
        ),
        v2.RandomHorizontalFlip(p=cfg.hflip_prob),
        v2.RandomApply(
            [v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue)],
            p=cfg.jitter_prob,
        ),
        v2.RandomGrayscale(p=cfg.grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(cfg), sigma=(cfg.blur_sigma_min, cfg.blur_sigma_max))],
                       p=blur_prob),
        v2.RandomSolarize(threshold=128, p=solarize_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class BarlowTwinsTransform:
    """Maps one image to two differently augmented views (blur/solarisation probabilities differ per view)."""

    def __init__(self, cfg: AugmentConfig, img_size: int):
        self.view1 = view_transform(cfg, img_size, cfg.blur_prob_1, cfg.solarize_prob_1)
        self.view2 = view_transform(cfg, img_size, cfg.blur_prob_2, cfg.solarize_prob_2)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)


# ------------------------------------------------------------------------------------ segmentation
def segmentation_train_transform(img_size: int, crop_scale_min: float, hflip_prob: float) -> v2.Compose:
    """Joint image/mask augmentation: the same crop and flip for both; the mask is resampled with
    nearest neighbours (tv_tensors.Mask) and keeps its uint8 labels; only the image is normalised."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(p=hflip_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def segmentation_eval_transform(img_size: int) -> v2.Compose:
    """Image (and mask, when one is passed) resized to img_size × img_size."""
    return v2.Compose([
        v2.Resize((img_size, img_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
