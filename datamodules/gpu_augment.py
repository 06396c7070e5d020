"""GPU augmentation mode (``--aug.device gpu_photometric``, formerly ``--aug.gpu=true``): the photometric half of
the Barlow Twins views, batched on the training device. (``gpu_full``, datamodules/device_decode.py, also moves
decoding and crops to the device and reuses :class:`PhotometricSampler` and :class:`DevicePhotometric`.)

The DataLoader workers decode, crop and flip (uint8 views) and draw every photometric parameter of every
view from the item's seeded RNG (:class:`PhotometricSampler`); the parameters travel with the batch as
tensors (:class:`PhotometricParams`). On the device, :class:`DevicePhotometric` applies colour jitter (its
four operations in each sample's own random order), grayscale, Gaussian blur and solarisation, each sample
with its own parameters, then normalises. torchvision's batched transforms cannot do this: they draw one
set of parameters per call, shared by the whole batch.

Everything here is tensor arithmetic on whatever device the batch is on: no Python loop over images and no
host synchronisation (no ``.item()``, no data-dependent branches), so it queues behind the training step.
The operations are the float versions of ``torchvision.transforms.v2.functional``'s (the CPU pipeline runs
them on uint8 and rounds after each step; here nothing is rounded).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from config.hparams import AugmentConfig
from datamodules.transforms import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, blur_kernel_size, color_jitter,
                                    gaussian_blur, two_crops)

# ITU-R 601-2 luma, torchvision's rgb_to_grayscale weights.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# ColorJitter's operation ids (torchvision's fn_idx order).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# A value solarises when it would be >= 128 as uint8: x·255 rounds to 128 or more. Half a level below 128
# keeps exact uint8 inputs (k/255 in float32) on the right side of the threshold despite rounding.
SOLARIZE_THRESHOLD = 127.5 / 255


# ----------------------------------------------------------------------------------- batched operations
def _per_sample(values: Tensor) -> Tensor:
    """(B,) parameters → (B, 1, 1, 1), broadcasting against (B, C, H, W) images."""
    return values.reshape(-1, 1, 1, 1)


def grayscale(images: Tensor) -> Tensor:
    """(B, 3, H, W) → (B, 1, H, W) luma."""
    r, g, b = images.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor·images + (1 − factor)·other, clamped to [0, 1] (torchvision's ``_blend``), factor per sample."""
    f = _per_sample(factor)
    return (f * images + (1 - f) * other).clamp(0, 1)


def hue_sextant(images: Tensor, maxc: Tensor, delta: Tensor) -> Tensor:
    """(B, 1, H, W) hue in sextants, [0, 6) up to a multiple of 6, as torchvision's rgb→hsv (ties resolved
    red, then green); 0 for grey pixels (delta = 0), where a divisor of 1 keeps it finite."""
    r, g, b = images.split(1, dim=-3)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    return torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate each image's hue by its shift (a fraction of the colour wheel, in [−0.5, 0.5]).

    rgb → hsv → rgb fused: value is the max channel and value·saturation the channel range, so channel
    n ∈ (5, 3, 1) of the result is max − range·clamp(min(k, 4 − k), 0, 1) with k = (n + 6·hue) mod 6
    (the piecewise-linear hue wheel); no saturation division, no lookup tables.
    """
    maxc, minc = images.amax(dim=-3, keepdim=True), images.amin(dim=-3, keepdim=True)
    delta = maxc - minc
    hue6 = hue_sextant(images, maxc, delta) + 6.0 * _per_sample(shift)
    # n = 5, 3, 1 for r, g, b, made on the device (no host-to-device copy)
    n = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = (n + hue6).remainder(6.0)
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def color_jitter_ops(images: Tensor, order: Tensor, brightness: Tensor, contrast: Tensor,
                     saturation: Tensor, hue: Tensor, use_hue: bool = True) -> Tensor:
    """ColorJitter with each sample's own operation order ``order`` (B, 4), a permutation of
    (BRIGHTNESS, CONTRAST, SATURATION, HUE) as torchvision's ``fn_idx``.

    At each of the four positions every sample gets the operation it draws there (``torch.where`` over the
    per-sample choice). Brightness, contrast and saturation are all blends (with black, the mean luma, the
    luma), so one blend with a per-sample reference covers them; the hue rotation is computed for the batch
    and kept where chosen. ``use_hue=False`` (hue strength 0) skips that computation: a zero shift is the
    identity.
    """
    factors = torch.stack((brightness, contrast, saturation, torch.ones_like(brightness)), dim=1)
    out = images
    for position in range(4):
        op = order[:, position]
        gray = grayscale(out)
        reference = torch.where(_per_sample(op == BRIGHTNESS), torch.zeros_like(gray),
                                torch.where(_per_sample(op == CONTRAST), gray.mean(dim=(-2, -1), keepdim=True), gray))
        blended = blend(out, reference, factors.gather(1, op.unsqueeze(1)).squeeze(1))
        if use_hue:
            out = torch.where(_per_sample(op == HUE), adjust_hue(out, hue), blended)
        else:
            out = torch.where(_per_sample(op == HUE), out, blended)
    return out


def random_grayscale(images: Tensor, apply: Tensor) -> Tensor:
    """Grayscale (3 equal channels) where ``apply`` (B,) is true."""
    return torch.where(_per_sample(apply), grayscale(images).expand_as(images), images)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(B,) sigmas → (B, kernel_size) normalised 1-D Gaussians exp(−i²/2σ²), i = −k//2 … k//2."""
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - kernel_size // 2
    weights = torch.exp(-0.5 * (offsets / sigma.float().unsqueeze(1)) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur_ops(images: Tensor, sigma: Tensor, apply: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur, each sample with its own sigma, reflect-padded as torchvision's; samples
    with ``apply`` false get a unit impulse kernel (unchanged).

    One depthwise (grouped) convolution per direction over all B·C channels, each with its sample's kernel.
    """
    b, c, h, w = images.shape
    kernels = gaussian_kernels(sigma, kernel_size)
    impulse = torch.zeros_like(kernels)
    impulse[:, kernel_size // 2] = 1.0
    kernels = torch.where(apply.unsqueeze(1), kernels, impulse).to(images.dtype)
    per_channel = kernels.repeat_interleave(c, dim=0)  # (B·C, k), channel-major within each sample
    pad = kernel_size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect").reshape(1, b * c, h + 2 * pad, w + 2 * pad)
    x = F.conv2d(x, per_channel.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(x, per_channel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.reshape(b, c, h, w)


def random_solarize(images: Tensor, apply: Tensor) -> Tensor:
    """1 − x for the values at or above the uint8 threshold 128 (see ``SOLARIZE_THRESHOLD``), where ``apply``."""
    return torch.where(_per_sample(apply) & (images >= SOLARIZE_THRESHOLD), 1.0 - images, images)


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """[0, 1] → ImageNet-normalised, as the CPU pipeline's ``Normalize``; mean and std (1, 3, 1, 1)."""
    return (images - mean) / std


# ----------------------------------------------------------------------------------- parameters
class PhotometricParams(NamedTuple):
    """Every random choice of one view's photometric augmentation, as tensors (0-d per item; the DataLoader
    collates them to (B,), ``order`` to (B, 4)). A view without jitter has neutral factors (1, 1, 1, 0)."""

    order: Tensor
    """int64 (4,): ColorJitter's operation order (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor
    """bool: convert to grayscale."""
    blur: Tensor
    """bool: blur, with ``blur_sigma`` (pixels)."""
    blur_sigma: Tensor
    solarize: Tensor
    """bool: solarise."""


def _applied(p: float) -> bool:
    """torchvision's random-apply test (``torch.rand(1) >= p`` skips), so the same draws decide the same."""
    return not bool(torch.rand(1) >= p)


class PhotometricSampler:
    """Draws one view's :class:`PhotometricParams` from the global torch RNG (seeded per item by the dataset).

    Uses torchvision's own parameter sampling (``ColorJitter.make_params``, ``GaussianBlur.make_params``)
    behind the same random-apply tests, in the order the CPU pipeline draws them: the distributions are the
    CPU pipeline's by construction, and for one item seed both modes draw the same crops and parameters.
    """

    def __init__(self, cfg: AugmentConfig, blur_prob: float, solarize_prob: float):
        self.jitter = color_jitter(cfg)
        self.blur = gaussian_blur(cfg)
        self.jitter_prob = cfg.jitter_prob
        self.grayscale_prob = cfg.grayscale_prob
        self.blur_prob = blur_prob
        self.solarize_prob = solarize_prob

    def _jitter(self) -> tuple[Tensor, list[float]]:
        """(order, [brightness, contrast, saturation, hue]); identity values where not applied or off."""
        neutral = [1.0, 1.0, 1.0, 0.0]
        if not _applied(self.jitter_prob):
            return torch.arange(4), neutral
        params = self.jitter.make_params([])
        drawn = [params["brightness_factor"], params["contrast_factor"], params["saturation_factor"],
                 params["hue_factor"]]
        return params["fn_idx"].to(torch.int64), [n if d is None else d for d, n in zip(drawn, neutral)]

    def __call__(self) -> PhotometricParams:
        order, (brightness, contrast, saturation, hue) = self._jitter()
        gray = _applied(self.grayscale_prob)
        blur = _applied(self.blur_prob)
        sigma = self.blur.make_params([])["sigma"][0] if blur else 1.0
        solarize = _applied(self.solarize_prob)
        scalar = lambda value: torch.tensor(value, dtype=torch.float32)  # noqa: E731
        flag = lambda value: torch.tensor(value, dtype=torch.bool)  # noqa: E731
        return PhotometricParams(order, scalar(brightness), scalar(contrast), scalar(saturation), scalar(hue),
                                 flag(gray), flag(blur), scalar(sigma), flag(solarize))


# ----------------------------------------------------------------------------------- on the device
class DevicePhotometric:
    """uint8 (B, 3, H, W) views + their collated :class:`PhotometricParams` → normalised float32 views, on
    the views' device: jitter → grayscale → blur → solarise → normalise, as the CPU pipeline."""

    def __init__(self, cfg: AugmentConfig):
        self.kernel_size = blur_kernel_size(cfg)
        self.use_hue = cfg.hue > 0
        self._normalisation: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers receive a pickled copy of the dataset and its transform: no device tensors.
        return {**self.__dict__, "_normalisation": {}}

    def normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """ImageNet mean and std on ``device``, copied there once (a copy from host memory can wait for
        the device; every later batch reuses them)."""
        if device not in self._normalisation:
            self._normalisation[device] = tuple(torch.tensor(v).view(1, 3, 1, 1).to(device)
                                                for v in (IMAGENET_MEAN, IMAGENET_STD))
        return self._normalisation[device]

    def __call__(self, views: Tensor, params: PhotometricParams) -> Tensor:
        params = PhotometricParams(*(t.to(views.device, non_blocking=True) for t in params))
        x = views.float() / 255.0
        x = color_jitter_ops(x, params.order, params.brightness, params.contrast, params.saturation, params.hue,
                             use_hue=self.use_hue)
        x = random_grayscale(x, params.grayscale)
        x = gaussian_blur_ops(x, params.blur_sigma, params.blur, self.kernel_size)
        x = random_solarize(x, params.solarize)
        return normalise(x, *self.normalisation(views.device))


class DeviceAugmentTransform:
    """The worker half of GPU mode: one image → a dict of two uint8 views (``view1``, ``view2``), their
    photometric parameters (``params1``, ``params2``) and, with ``geometry``, their crop boxes
    (``geometry1``, ``geometry2``, see :func:`datamodules.transforms.crop_geometry`).

    :meth:`finish_batch` is the device half: a collated (and transferred) batch → ``(x1, x2)`` or
    ``(x1, x2, g1, g2)``, exactly what the CPU mode's workers deliver.
    """

    def __init__(self, cfg: AugmentConfig, img_size: int, shared_crop: bool = False, geometry: bool = False):
        self.crop = CropFlip(cfg, img_size)
        self.sample1 = PhotometricSampler(cfg, cfg.blur_prob_1, cfg.solarize_prob_1)
        self.sample2 = PhotometricSampler(cfg, cfg.blur_prob_2, cfg.solarize_prob_2)
        self.photometric = DevicePhotometric(cfg)
        self.shared_crop = shared_crop
        self.geometry = geometry

    def __call__(self, image: torch.Tensor) -> dict:
        (view1, params1), (view2, params2), geometry1, geometry2 = two_crops(
            image, self.crop, lambda view: (view, self.sample1()), lambda view: (view, self.sample2()),
            self.shared_crop)
        item = {"view1": view1, "view2": view2, "params1": params1, "params2": params2}
        if self.geometry:
            item.update(geometry1=geometry1, geometry2=geometry2)
        return item

    def finish_batch(self, batch: dict) -> tuple[Tensor, ...]:
        x1 = self.photometric(batch["view1"], batch["params1"])
        x2 = self.photometric(batch["view2"], batch["params2"])
        if self.geometry:
            return x1, x2, batch["geometry1"], batch["geometry2"]
        return x1, x2

