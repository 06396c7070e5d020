"""DINO's multi-crop augmentation (Caron et al., 2021; facebookresearch/dino ``DataAugmentationDINO``).

One image → ``[global 1, global 2, local 1, ..., local N]``, each view with its own random crop and the
official per-view photometric recipe, drawn in the official order (view after view, each: crop, flip,
colour jitter, grayscale, blur, solarisation):

============  ========================  ==========================  ====================  ===================
view          size                      crop scale                  blur probability      solarise probability
============  ========================  ==========================  ====================  ===================
global 1      data.img_size             aug.crop_scale_min/max      aug.blur_prob_1       aug.solarize_prob_1
global 2      data.img_size             aug.crop_scale_min/max      aug.blur_prob_2       aug.solarize_prob_2
local 1..N    :func:`resolve_local_size` dino.local_crops_scale_*    dino.local_blur_prob  0
============  ========================  ==========================  ====================  ===================

With ``--task=dino`` these are DINO's values: globals 0.4–1 (TASK_DEFAULTS), blur 1.0 / 0.1, solarise 0 / 0.2,
locals 96 px at 224 px inputs, 0.05–0.4, blur 0.5. Flip (0.5), colour jitter (0.4, 0.4, 0.2, 0.1 with
probability 0.8) and grayscale (0.2) are the aug.* fields every view shares, as in the official code.

Every view is made by the Barlow Twins building blocks (:class:`datamodules.transforms.CropFlip`,
:func:`datamodules.transforms.photometric_transforms`; in ``--aug.gpu`` mode
:class:`datamodules.gpu_augment.PhotometricSampler` and :class:`datamodules.gpu_augment.DevicePhotometric`),
configured per view by a :class:`ViewSpec`. Differences from the official PIL pipeline are those of the
Barlow Twins pipeline (torchvision tensor kernels; the blur kernel is aug.blur_kernel_size or ±3 σ wide
where PIL's is its own; see datamodules/transforms.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchvision.transforms import v2

from config.hparams import AugmentConfig, DinoConfig, Hparams
from datamodules.gpu_augment import DevicePhotometric, PhotometricParams, PhotometricSampler
from datamodules.transforms import CropFlip, blur_kernel_size, photometric_transforms, to_normalised_float

# The official local crops: 96 px for 224 px inputs.
OFFICIAL_LOCAL_SIZE, OFFICIAL_GLOBAL_SIZE = 96, 224


# ------------------------------------------------------------------------------------------- sizes
def default_local_size(img_size: int, patch_size: int) -> int:
    """img_size × 96/224 rounded to the nearest multiple of ``patch_size`` (halves up), at least one patch:
    the official 96 px at 224 px inputs for patch 16 and 8, 98 px (7 patches) for patch 14."""
    numerator, denominator = img_size * OFFICIAL_LOCAL_SIZE, OFFICIAL_GLOBAL_SIZE * patch_size
    patches = (2 * numerator + denominator) // (2 * denominator)  # round(numerator / denominator), halves up
    return max(1, patches) * patch_size


def resolve_local_size(img_size: int, dino: DinoConfig, granularity: Optional[int]) -> int:
    """dino.local_crop_size, or (when 0) :func:`default_local_size` for the backbone's patch size
    ``granularity`` (:func:`models.backbones.input_granularity`)."""
    if dino.local_crop_size > 0:
        return dino.local_crop_size
    if granularity is None:
        raise ValueError("dino.local_crop_size=0 (automatic) needs the backbone's patch size")
    return default_local_size(img_size, granularity)


def multicrop_problem(cfg: Hparams, granularity: int) -> Optional[str]:
    """What in ``cfg`` the multi-crop data cannot do, in one line naming the flag, or None. For the dino
    task's ``check_config`` (before any data or model is touched). ``granularity``: the backbone's patch
    size (:func:`models.backbones.input_granularity`; ResNet-50: its output stride 32)."""
    dino, aug = cfg.dino, cfg.aug
    local = resolve_local_size(cfg.data.img_size, dino, granularity)
    if dino.local_crops_number > 0 and dino.local_crop_size > 0 and dino.local_crop_size % granularity:
        lower = dino.local_crop_size // granularity * granularity
        options = f"{lower} or {lower + granularity}" if lower else f"{granularity}"
        return (f"--dino.local_crop_size={dino.local_crop_size} must be a multiple of the backbone's "
                f"{'output stride' if cfg.backbone.name == 'resnet50' else 'patch size'} ({granularity}), "
                f"e.g. {options} (or 0 = automatic: {default_local_size(cfg.data.img_size, granularity)})")
    # Both augmentation modes blur with reflect padding of kernel // 2, which must be less than the view.
    kernel = blur_kernel_size(aug)
    sizes = [("--data.img_size", cfg.data.img_size, max(aug.blur_prob_1, aug.blur_prob_2))]
    if dino.local_crops_number > 0:
        source = f"--dino.local_crop_size={dino.local_crop_size}" if dino.local_crop_size else \
            f"the automatic --dino.local_crop_size ({local} px)"
        sizes.append((source, local, dino.local_blur_prob))
    for name, size, blur_prob in sizes:
        if blur_prob > 0 and size <= kernel // 2:
            kernel_source = "--aug.blur_kernel_size" if aug.blur_kernel_size else \
                "the kernel implied by --aug.blur_sigma_max"
            return (f"{kernel_source} ({kernel} px) needs {kernel // 2} px of reflect padding, which must be less "
                    f"than the {size} px crops of {name}; use a kernel of at most {2 * size - 1} or larger crops")
    return None


# ------------------------------------------------------------------------------------------- views
@dataclass(frozen=True)
class ViewSpec:
    """Everything that differs between the views of one image: output side, crop scale range, and the
    probabilities of blur and solarisation (the other augmentations are the aug.* fields, shared)."""

    name: str
    """'global 1', 'global 2', 'local 1', ...: for pictures and messages."""
    size: int
    """Output side in pixels (square views)."""
    scale: tuple[float, float]
    """RandomResizedCrop area range, as fractions of the image."""
    blur_prob: float
    solarize_prob: float


def multicrop_views(aug: AugmentConfig, img_size: int, dino: DinoConfig, local_size: int) -> list[ViewSpec]:
    """The 2 global and dino.local_crops_number local views, in batch order (see the module docstring)."""
    global_scale = (aug.crop_scale_min, aug.crop_scale_max)
    views = [ViewSpec("global 1", img_size, global_scale, aug.blur_prob_1, aug.solarize_prob_1),
             ViewSpec("global 2", img_size, global_scale, aug.blur_prob_2, aug.solarize_prob_2)]
    local_scale = (dino.local_crops_scale_min, dino.local_crops_scale_max)
    # The official local pipeline has no solarisation.
    views += [ViewSpec(f"local {i + 1}", local_size, local_scale, dino.local_blur_prob, 0.0)
              for i in range(dino.local_crops_number)]
    return views


def view_crop(aug: AugmentConfig, view: ViewSpec) -> CropFlip:
    """The Barlow Twins crop-and-flip with this view's scale range and size."""
    return CropFlip(dataclasses.replace(aug, crop_scale_min=view.scale[0], crop_scale_max=view.scale[1]), view.size)


class MultiCropTransform:
    """One uint8 (3, H, W) image → a list of normalised float32 views, ``views[i]`` of shape
    (3, size, size) as :attr:`views` ``[i]`` says: [global 1, global 2, local 1, ..., local N].

    Random draws: view after view, each crop → flip → photometric ones, as the official
    ``DataAugmentationDINO`` (the same order as a torchvision Compose per view run one after the other)."""

    def __init__(self, aug: AugmentConfig, img_size: int, dino: DinoConfig, local_size: int):
        self.views = multicrop_views(aug, img_size, dino, local_size)
        self.crops = [view_crop(aug, view) for view in self.views]
        self.photometric = [v2.Compose([*photometric_transforms(aug, view.blur_prob, view.solarize_prob),
                                        *to_normalised_float()]) for view in self.views]

    def __call__(self, image: Tensor) -> list[Tensor]:
        out = []
        for crop, photometric in zip(self.crops, self.photometric):
            view, _ = crop(image)
            out.append(photometric(view))
        return out

    def finish_batch(self, batch):
        """The workers already finished the views: a collated batch is what the model trains on."""
        return batch


class DeviceMultiCropTransform:
    """``--aug.gpu`` mode: the workers crop and flip (uint8) and draw every photometric parameter from the
    item's seed (the same draws, in the same order, as :class:`MultiCropTransform`); :meth:`finish_batch`
    applies the photometric operations batched on the batch's device.

    An item is ``{"crops": [uint8 view per ViewSpec], "params": [PhotometricParams per view]}``."""

    def __init__(self, aug: AugmentConfig, img_size: int, dino: DinoConfig, local_size: int):
        self.views = multicrop_views(aug, img_size, dino, local_size)
        self.crops = [view_crop(aug, view) for view in self.views]
        self.samplers = [PhotometricSampler(aug, view.blur_prob, view.solarize_prob) for view in self.views]
        self.photometric = DevicePhotometric(aug)

    def __call__(self, image: Tensor) -> dict:
        crops, params = [], []
        for crop, sample in zip(self.crops, self.samplers):
            view, _ = crop(image)
            crops.append(view)
            params.append(sample())
        return {"crops": crops, "params": params}

    def finish_batch(self, batch: dict) -> list[Tensor]:
        """Collated (B, 3, S, S) uint8 views and their parameters → the list of normalised float views.
        Views of one size (the globals, the locals) go through the device operations together."""
        crops, params = batch["crops"], batch["params"]
        out: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape == crops[start].shape:
                end += 1
            views = torch.cat(crops[start:end])
            group = PhotometricParams(*(torch.cat(field) for field in zip(*params[start:end])))
            out.extend(self.photometric(views, group).split(crops[start].shape[0]))
            start = end
        return out
