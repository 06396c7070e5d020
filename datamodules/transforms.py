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


def crop_transform(cfg: AugmentConfig, img_size: int) -> v2.RandomResizedCrop:
    """The random crop both pipelines start with (crop first: every later operation runs on img_size²)."""
    return v2.RandomResizedCrop(
        img_size,
        scale=(cfg.crop_scale_min, cfg.crop_scale_max),
        interpolation=_INTERPOLATION[cfg.crop_interpolation],
        antialias=True,
    )


def color_jitter(cfg: AugmentConfig) -> v2.ColorJitter:
    """Shared by the CPU pipeline and the device-mode parameter sampler, so both draw identical factors."""
    return v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue)


def gaussian_blur(cfg: AugmentConfig) -> v2.GaussianBlur:
    """Shared by the CPU pipeline and the device-mode parameter sampler (same sigma distribution)."""
    return v2.GaussianBlur(blur_kernel_size(cfg), sigma=(cfg.blur_sigma_min, cfg.blur_sigma_max))


def photometric_transforms(cfg: AugmentConfig, blur_prob: float, solarize_prob: float) -> list[v2.Transform]:
    """Colour jitter → grayscale → blur → solarisation on a uint8 view, as the PIL pipeline of the official
    code does (solarisation threshold 128)."""
    return [
        v2.RandomApply([color_jitter(cfg)], p=cfg.jitter_prob),
        v2.RandomGrayscale(p=cfg.grayscale_prob),
        v2.RandomApply([gaussian_blur(cfg)], p=blur_prob),
        v2.RandomSolarize(threshold=128, p=solarize_prob),
    ]


def to_normalised_float() -> list[v2.Transform]:
    """uint8 → float32 in [0, 1] → ImageNet-normalised."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def view_transform(cfg: AugmentConfig, img_size: int, blur_prob: float, solarize_prob: float) -> v2.Compose:
    """One view's whole pipeline on a uint8 (3, H, W) tensor → normalised float32 (3, img_size, img_size).

    :class:`BarlowTwinsTransform` runs the same transforms in two steps (:class:`CropFlip`, then the
    photometric part), which draws the same random numbers in the same order: same seed, same pixels.
    """
    return v2.Compose([
        crop_transform(cfg, img_size),
        v2.RandomHorizontalFlip(p=cfg.hflip_prob),
        *photometric_transforms(cfg, blur_prob, solarize_prob),
        *to_normalised_float(),
    ])


def crop_geometry(top: int, left: int, height: int, width: int, image_height: int, image_width: int,
                  flipped: bool) -> torch.Tensor:
    """float32 ``(y0, x0, y1, x1, flipped)``: the crop box in the original image, normalised to [0, 1]
    (exclusive bottom/right edges), and whether the view was flipped horizontally after cropping.

    View point (u, v) in [0, 1]² shows the original point y = y0 + u·(y1 − y0),
    x = x0 + (v, or 1 − v when flipped)·(x1 − x0): what a dense objective needs to match positions.
    """
    return torch.tensor([top / image_height, left / image_width, (top + height) / image_height,
                         (left + width) / image_width, float(flipped)], dtype=torch.float32)


def size_only(height: int, width: int) -> torch.Tensor:
    """A (3, height, width) uint8 tensor that owns one byte (stride 0): torchvision's parameter samplers read
    only an input's size, and this one costs nothing to make."""
    return torch.empty(1, dtype=torch.uint8).expand(3, height, width)


class CropFlip:
    """RandomResizedCrop then a horizontal flip of a uint8 (3, H, W) image, reporting where the view lies.

    Draws exactly what ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` draws from the global RNG, in
    the same order (torchvision's own crop sampler, then one ``torch.rand(1)`` for the flip), so splitting
    the pipeline here changes no pixel.
    """

    def __init__(self, cfg: AugmentConfig, img_size: int):
        self.crop = crop_transform(cfg, img_size)
        self.hflip_prob = cfg.hflip_prob

    @classmethod
    def of(cls, crop: v2.RandomResizedCrop, hflip_prob: float) -> "CropFlip":
        """A CropFlip around any RandomResizedCrop (the segmentation pipeline's has its own scale range)."""
        instance = cls.__new__(cls)
        instance.crop, instance.hflip_prob = crop, hflip_prob
        return instance

    def draw(self, height: int, width: int) -> tuple[dict, bool]:
        """The random choices alone, for an image of ``height`` × ``width``: the crop box (torchvision's
        ``{"top", "left", "height", "width"}``) and the flip. Needs only the size, so the device-resident
        mode (datamodules/device_decode.py) draws them without decoding the image."""
        params = self.crop.make_params([size_only(height, width)])
        return params, not bool(torch.rand(1) >= self.hflip_prob)  # RandomHorizontalFlip's own test

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        params, flipped = self.draw(height, width)
        view = self.crop.transform(image, params)
        if flipped:
            view = v2.functional.horizontal_flip(view)
        geometry = crop_geometry(params["top"], params["left"], params["height"], params["width"], height, width, flipped)
        return view, geometry


def two_crops(image: torch.Tensor, crop: CropFlip, finish_first, finish_second, shared_crop: bool):
    """``(first, second, geometry1, geometry2)``: each view cropped (once, for both, with ``shared_crop``)
    and passed to its ``finish`` callable.

    Random draws in the order of two whole view pipelines run one after the other (crop 1, view 1's
    photometric draws, crop 2, ...), so the default path reproduces the per-view Compose pipelines.
    """
    view, geometry1 = crop(image)
    first = finish_first(view)
    if shared_crop:
        geometry2 = geometry1.clone()
    else:
        view, geometry2 = crop(image)
    return first, finish_second(view), geometry1, geometry2


class BarlowTwinsTransform:
    """Maps one image to two differently augmented, normalised views (blur/solarisation probabilities differ
    per view): ``(view1, view2)``, or ``(view1, view2, geometry1, geometry2)`` with ``geometry`` (see
    :func:`crop_geometry`). ``shared_crop``: both views come from one crop and flip; only the photometric
    augmentations differ."""

    def __init__(self, cfg: AugmentConfig, img_size: int, shared_crop: bool = False, geometry: bool = False):
        self.crop = CropFlip(cfg, img_size)
        self.photometric1 = v2.Compose([*photometric_transforms(cfg, cfg.blur_prob_1, cfg.solarize_prob_1),
                                        *to_normalised_float()])
        self.photometric2 = v2.Compose([*photometric_transforms(cfg, cfg.blur_prob_2, cfg.solarize_prob_2),
                                        *to_normalised_float()])
        self.shared_crop = shared_crop
        self.geometry = geometry

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        view1, view2, geometry1, geometry2 = two_crops(image, self.crop, self.photometric1, self.photometric2,
                                                       self.shared_crop)
        return (view1, view2, geometry1, geometry2) if self.geometry else (view1, view2)

    def finish_batch(self, batch):
        """The workers already finished the views: a collated batch is what the model trains on."""
        return batch


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
