"""Device-resident data path (``--aug.device gpu_full``): JPEG decoding, random resized crops, flips and the
photometric augmentations all run batched on the training device.

The DataLoader workers only read each file's bytes and its size (a header read, no decoding), and draw every
random choice of every view from the item's seed with the very calls the CPU pipeline makes, in the same
order (:meth:`datamodules.transforms.CropFlip.draw`, then
:class:`datamodules.gpu_augment.PhotometricSampler`): a seed gives the same crop boxes, flips and parameters in
every mode and for any worker count. A view is a :class:`DeviceViewSpec` (output size, scale range, interpolation,
photometric probabilities): two for Barlow Twins, more for a multi-crop recipe, one for segmentation.

On the device (:class:`DeviceViews`, called from the datamodule's ``on_after_batch_transfer``):

1. decode: ``torchvision.io.decode_jpeg(list_of_byte_tensors, device=...)``, one batched call (nvJPEG on
   CUDA; on the CPU the same call runs libjpeg-turbo, the decoder of the CPU pipeline). Other formats (PNG,
   CMYK JPEGs) are decoded one by one with ``decode_image`` on the CPU and copied over.
2. crop + resize: the images are zero-padded into one batch and every view is resampled with two batched
   matrix products, ``rows @ image @ columns``, whose matrices hold each view's own antialiased resampling
   weights over its crop box (zero outside). The weights are PyTorch's antialiased bicubic/bilinear
   kernels' (``interpolate(..., antialias=True)``), quantised as its uint8 CPU kernel does (int16 fixed
   point, horizontal pass first, rounding between the passes), so the crops equal the CPU pipeline's
   uint8 crops: measured on 7.2 million pixels of 500 × 375 crops resized to 32–224 px, 3 pixels one level
   apart (float32 sums meeting a rounding tie), bicubic and bilinear alike. A flip reverses the columns
   matrix.
3. the photometric operations of :class:`datamodules.gpu_augment.DevicePhotometric`, each view with its
   own parameters, then normalisation.

Why matrices rather than ``roi_align``/``grid_sample``: neither applies the antialiasing filter torchvision's
``resized_crop`` uses when it shrinks (``roi_align`` averages bilinear samples, ``grid_sample`` point-samples),
so they would not reproduce the CPU pipeline's pixels; benchmarks/bench_data.py ``--compare-resamplers``
measures how far they are. The products cost ~0.5 GFLOP per 224 px view of a 500 × 375 image.

Segmentation masks are decoded on the CPU in the workers (palette PNGs read as class ids, never RGB),
padded with 255 when collated, and cropped/resized on the device with nearest neighbours (PyTorch's
``floor(i · in/out)`` in float32, exactly as the CPU pipeline's ``Mask`` resize).
"""
from __future__ import annotations

import io
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from config.hparams import AugmentConfig
from datamodules.errors import DataError
from datamodules.images import undecodable
from datamodules.gpu_augment import DevicePhotometric, PhotometricParams, PhotometricSampler
from datamodules.multicrop import multicrop_views, view_crop
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, CropFlip, crop_geometry

# PIL modes of JPEGs nvJPEG/libjpeg-turbo turn into RGB in the batched call; others (CMYK, YCCK) go one by one.
_BATCHED_JPEG_MODES = ("RGB", "L")


# ----------------------------------------------------------------------------------- worker side
class EncodedImage:
    """One image file as the workers hand it over: its bytes (uint8, 1-D, on the CPU), size and format.

    Deliberately not a tensor and without ``.to``: Lightning's batch transfer leaves it on the CPU, where
    ``decode_jpeg`` wants its input whatever the decoding device."""

    __slots__ = ("data", "height", "width", "batched_jpeg", "path")

    def __init__(self, data: Tensor, height: int, width: int, batched_jpeg: bool, path: str):
        self.data, self.height, self.width, self.batched_jpeg, self.path = data, height, width, batched_jpeg, path


def read_encoded(path: str | Path) -> EncodedImage:
    """The file's bytes and its size from the header (PIL opens lazily: nothing is decoded here).

    A file that is not an image is named now, in the worker; damage past the header (a truncated JPEG)
    is found by the decoder on the device, which names the file too (:func:`decode_images`)."""
    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            batched = image.format == "JPEG" and image.mode in _BATCHED_JPEG_MODES
        # A tensor owning its memory (torchvision's read_file maps the file, which the DataLoader workers
        # cannot hand over to the main process).
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    except Exception as err:  # noqa: BLE001 - PIL raises UnidentifiedImageError/OSError/SyntaxError by damage
        raise undecodable(path, err) from None
    return EncodedImage(data, height, width, batched, str(path))


class EncodedBatch:
    """The collated :class:`EncodedImage` s of a batch (stays on the CPU through the batch transfer)."""

    def __init__(self, images: Sequence[EncodedImage]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> "EncodedBatch":
        """The DataLoader's ``pin_memory``: page-locked bytes copy to the device faster."""
        return EncodedBatch([EncodedImage(e.data.pin_memory(), e.height, e.width, e.batched_jpeg, e.path)
                             for e in self.images])


def pad_masks(masks: Sequence[Tensor], fill: int = 255) -> Tensor:
    """uint8 (H_i, W_i) masks → one (B, max H, max W) tensor, padded with ``fill`` (never read: the crops lie
    inside each image)."""
    height, width = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    out = torch.full((len(masks), height, width), fill, dtype=torch.uint8)
    for i, mask in enumerate(masks):
        out[i, : mask.shape[0], : mask.shape[1]] = mask
    return out


def collate_encoded(items: list[dict]) -> dict:
    """DataLoader ``collate_fn``: ``encoded`` into an :class:`EncodedBatch`, ``mask`` padded into one tensor,
    everything else with ``default_collate``."""
    batch = default_collate([{k: v for k, v in item.items() if k not in ("encoded", "mask")} for item in items])
    batch["encoded"] = EncodedBatch([item["encoded"] for item in items])
    if "mask" in items[0]:
        batch["mask"] = pad_masks([item["mask"] for item in items])
    return batch


@dataclass(frozen=True)
class DeviceViewSpec:
    """What one view of an item is: output side, the random resized crop and flip it draws (CropFlip), the
    interpolation of its resize, and which photometric parameters it draws (None: no photometric step, e.g.
    segmentation)."""

    size: int
    crop: CropFlip
    interpolation: str
    photometric: Optional[PhotometricSampler]


def barlow_twins_views(cfg: AugmentConfig, img_size: int) -> list[DeviceViewSpec]:
    """The two Barlow Twins views (the official asymmetric blur/solarisation probabilities)."""
    crop = CropFlip(cfg, img_size)
    return [DeviceViewSpec(img_size, crop, cfg.crop_interpolation, PhotometricSampler(cfg, cfg.blur_prob_1, cfg.solarize_prob_1)),
            DeviceViewSpec(img_size, crop, cfg.crop_interpolation, PhotometricSampler(cfg, cfg.blur_prob_2, cfg.solarize_prob_2))]


def draw_view(spec: DeviceViewSpec, height: int, width: int, geometry: bool) -> dict:
    """One view's random choices, in the CPU pipeline's order: crop box, flip, then the photometric draws."""
    params, flipped = spec.crop.draw(height, width)
    view = {"box": torch.tensor([params["top"], params["left"], params["height"], params["width"]], dtype=torch.int64),
            "flip": torch.tensor(flipped)}
    if spec.photometric is not None:
        view["params"] = spec.photometric()
    if geometry:
        view["geometry"] = crop_geometry(params["top"], params["left"], params["height"], params["width"],
                                         height, width, flipped)
    return view


def shared_view(first: dict, spec: DeviceViewSpec) -> dict:
    """A second view on the first one's crop and flip (``shared_crop``), with its own photometric draws."""
    view = {k: v.clone() for k, v in first.items() if k != "params"}
    if spec.photometric is not None:
        view["params"] = spec.photometric()
    return view


# ----------------------------------------------------------------------------------- device side: decoding
def decode_images(encoded: EncodedBatch, device: torch.device) -> list[Tensor]:
    """uint8 (3, H, W) images on ``device``: the batch's plain JPEGs in one ``decode_jpeg`` call there, the
    rest (PNG, CMYK JPEG, ...) one by one with ``decode_image`` on the CPU. A file that fails is named."""
    images: list[Optional[Tensor]] = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded.images) if e.batched_jpeg]
    if jpegs:
        try:
            decoded = decode_jpeg([encoded.images[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(encoded.images[i], device, jpeg=True) for i in jpegs]  # finds the culprit
        for i, image in zip(jpegs, decoded):
            images[i] = image
    for i, item in enumerate(encoded.images):
        if images[i] is None:
            images[i] = _decode_one(item, device, jpeg=False)
        if tuple(images[i].shape[-2:]) != (item.height, item.width):
            raise DataError(f"cannot decode image {item.path}: its header says {item.width}×{item.height} "
                            f"pixels, the decoder gave {images[i].shape[-1]}×{images[i].shape[-2]}")
    return images


def _decode_one(item: EncodedImage, device: torch.device, jpeg: bool) -> Tensor:
    try:
        if jpeg:
            return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=device)
        return decode_image(item.data, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError/ValueError depending on damage
        raise undecodable(item.path, err) from None


def pad_images(images: Sequence[Tensor]) -> Tensor:
    """uint8 (3, H_i, W_i) images → float32 (B, 3, max H, max W), zero-padded (one copy per image)."""
    height, width = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    out = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=images[0].device)
    for i, image in enumerate(images):
        out[i, :, : image.shape[-2], : image.shape[-1]] = image
    return out.float()


# ----------------------------------------------------------------------------------- device side: resampling
def _filter(x: Tensor, interpolation: str) -> Tensor:
    """PyTorch's antialiasing filters: Keys cubic (a = −0.5) or the triangle."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrices(start: Tensor, length: Tensor, out_size: int, padded_size: int, interpolation: str) -> Tensor:
    """(N, out_size, padded_size) float32: row i holds output pixel i's weights over the input axis, for N
    crops ``[start, start + length)`` resized to ``out_size`` with antialiasing.

    A transcription of PyTorch's ``_compute_weights_aa`` (support ``interp_size/2 · scale`` when shrinking,
    filter argument divided by the scale, taps clipped to the crop, weights normalised) followed by its
    uint8 kernel's int16 quantisation (``_compute_index_ranges_int16_weights``: the largest precision
    below 2^22 whose largest weight still fits in int16, round half away from zero). Computed in float64
    on the device, like PyTorch's weights, over each output pixel's window of taps only (as many as the
    largest possible crop, ``padded_size``, needs: a bound known without reading the boxes, so no host
    synchronisation), then scattered into the dense matrices.
    """
    device = start.device
    start, length = start.double(), length.double()
    half = 2.0 if interpolation == "bicubic" else 1.0                          # interp_size / 2
    taps = math.ceil(2 * half * max(padded_size / out_size, 1.0)) + 2          # window width, worst case
    scale = length / out_size                                                  # (N,)
    support = torch.where(scale >= 1, half * scale, torch.full_like(scale, half))
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale[:, None] * (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5)  # (N, out)
    low = (center - support[:, None] + 0.5).trunc().clamp(min=0)              # C's static_cast<int64_t>
    high = torch.minimum((center + support[:, None] + 0.5).trunc(), length[:, None])
    position = low[..., None] + torch.arange(taps, dtype=torch.float64, device=device)   # (N, out, taps), crop coords
    weights = _filter((position - center[..., None] + 0.5) * inverse[:, None, None], interpolation)
    weights = torch.where(position < high[..., None], weights, torch.zeros_like(weights))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    # int16 fixed point, as the uint8 kernel: precision p = the first p < 22 where round(max · 2^(p+1)) ≥ 2^15
    largest = weights.amax(dim=(1, 2))
    candidates = torch.arange(22, dtype=torch.float64, device=device)
    too_big = (0.5 + largest[:, None] * 2.0 ** (candidates + 1)).floor() >= 2 ** 15
    precision = torch.where(too_big.any(dim=1), too_big.double().argmax(dim=1).double(), torch.full_like(largest, 22.0))
    unit = (2.0 ** precision)[:, None, None]
    scaled = weights * unit
    quantised = ((scaled + torch.where(scaled < 0, -0.5, 0.5)).trunc() / unit).float()
    # taps past the crop carry weight 0; their clamped index only adds 0 to a real entry
    index = (position + start[:, None, None]).long().clamp(max=padded_size - 1)
    dense = torch.zeros(start.shape[0], out_size, padded_size, dtype=torch.float32, device=device)
    return dense.scatter_add_(2, index, quantised)


def _round_uint8(x: Tensor) -> Tensor:
    """The uint8 kernel's output: (sum + half) >> precision, clamped to 0..255, kept in float."""
    return (x + 0.5).floor_().clamp_(0, 255)


@contextmanager
def ieee_float32_matmul():
    """Full float32 products for the resampling even where the training allows TF32 (10-bit mantissa), which
    would move many crop pixels by a level. The setting is read when a product is launched, so restoring it
    right after changes nothing for the training step."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def resized_crops(images: Tensor, boxes: Tensor, flips: Tensor, out_size: int, interpolation: str) -> Tensor:
    """Every view of every image, cropped, resized and flipped: float32 (B, V, 3, out, out) of uint8 values.

    ``images``: float32 (B, 3, H, W) padded batch; ``boxes``: int64 (B, V, 4) ``(top, left, height, width)``
    in each image; ``flips``: bool (B, V). Two batched products per call, no loop over images or views:
    horizontal pass ``(B, 3·H, W) @ (B, W, V·out)``, rounded like the uint8 kernel's intermediate image,
    then the vertical pass ``(B·V, out, H) @ (B·V, H, 3·out)``.
    """
    b, v = boxes.shape[:2]
    _, c, height, width = images.shape
    flat = boxes.reshape(b * v, 4)
    columns = resample_matrices(flat[:, 1], flat[:, 3], out_size, width, interpolation)   # (BV, out, W)
    columns = torch.where(flips.reshape(-1, 1, 1), columns.flip(1), columns)
    rows = resample_matrices(flat[:, 0], flat[:, 2], out_size, height, interpolation)     # (BV, out, H)
    with ieee_float32_matmul():
        columns = columns.reshape(b, v * out_size, width).transpose(1, 2)                 # (B, W, V·out)
        horizontal = _round_uint8(torch.bmm(images.reshape(b, c * height, width), columns))  # (B, 3H, V·out)
        horizontal = (horizontal.reshape(b, c, height, v, out_size).permute(0, 3, 2, 1, 4)
                      .reshape(b * v, height, c * out_size))                              # (BV, H, 3·out)
        vertical = _round_uint8(torch.bmm(rows, horizontal))                              # (BV, out, 3·out)
    return vertical.reshape(b, v, out_size, c, out_size).permute(0, 1, 3, 2, 4)


def nearest_indices(start: Tensor, length: Tensor, out_size: int) -> Tensor:
    """(N, out_size) int64 source indices of a nearest resize of crops ``[start, start + length)``, as
    PyTorch's ``nearest_idx``: ``min(floor(i · (float)in/out), in − 1)`` in float32, plus the offset."""
    scale = length.float() / out_size
    i = torch.arange(out_size, dtype=torch.float32, device=start.device)
    index = torch.minimum((i[None] * scale[:, None]).floor().long(), length[:, None] - 1)
    return index + start[:, None]


def nearest_crops(masks: Tensor, boxes: Tensor, flips: Tensor, out_size: int) -> Tensor:
    """uint8 (B, H, W) padded masks → (B, out, out) crops resized with nearest neighbours and flipped; one
    gather for the batch."""
    rows = nearest_indices(boxes[:, 0], boxes[:, 2], out_size)
    columns = nearest_indices(boxes[:, 1], boxes[:, 3], out_size)
    columns = torch.where(flips[:, None], columns.flip(1), columns)
    batch = torch.arange(masks.shape[0], device=masks.device)[:, None, None]
    return masks[batch, rows[:, :, None], columns[:, None, :]]


# ----------------------------------------------------------------------------------- the transforms
class DeviceViews:
    """Decoding, crops and photometric operations of a collated batch of view specs, on the batch's device."""

    def __init__(self, cfg: Optional[AugmentConfig], specs: Sequence[DeviceViewSpec]):
        self.specs = list(specs)
        self.photometric = DevicePhotometric(cfg) if cfg is not None else None
        self._normalisation: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_normalisation": {}}  # workers get a copy: no device tensors

    def groups(self) -> list[tuple[int, str, list[int]]]:
        """Views resampled together: (size, interpolation, view indices), in order of first appearance."""
        found: dict[tuple[int, str], list[int]] = {}
        for index, spec in enumerate(self.specs):
            found.setdefault((spec.size, spec.interpolation), []).append(index)
        return [(size, interpolation, indices) for (size, interpolation), indices in found.items()]

    def crops(self, batch: dict) -> tuple[list[Tensor], list[Tensor]]:
        """uint8-valued float32 (B, 3, size, size) crops of every view, and the decoded images."""
        device = batch["views"][0]["box"].device
        decoded = decode_images(batch["encoded"], device)
        images = pad_images(decoded)
        views: list[Optional[Tensor]] = [None] * len(self.specs)
        for size, interpolation, indices in self.groups():
            boxes = torch.stack([batch["views"][i]["box"] for i in indices], dim=1)
            flips = torch.stack([batch["views"][i]["flip"] for i in indices], dim=1)
            crops = resized_crops(images, boxes, flips, size, interpolation)
            for position, index in enumerate(indices):
                views[index] = crops[:, position]
        return views, decoded

    def normalised(self, views: Tensor) -> Tensor:
        """[0, 255] → ImageNet-normalised, as the CPU pipeline's ToDtype + Normalize."""
        if views.device not in self._normalisation:
            self._normalisation[views.device] = tuple(torch.tensor(v).view(1, 3, 1, 1).to(views.device)
                                                      for v in (IMAGENET_MEAN, IMAGENET_STD))
        mean, std = self._normalisation[views.device]
        return (views / 255.0 - mean) / std

    def __call__(self, batch: dict) -> list[Tensor]:
        """The normalised float32 views, one (B, 3, size, size) tensor per spec."""
        views, _ = self.crops(batch)
        out = []
        for view, spec, drawn in zip(views, self.specs, batch["views"]):
            if spec.photometric is not None:
                out.append(self.photometric(view, PhotometricParams(*drawn["params"])))
            else:
                out.append(self.normalised(view))
        return out


class EncodedTwoViewTransform:
    """``--aug.device gpu_full`` for Barlow Twins. Worker half (:meth:`load`, ``__call__``): a file → its
    bytes and size plus both views' random choices. Device half (:meth:`finish_batch`): ``(x1, x2)`` or
    ``(x1, x2, g1, g2)``, the batch format of the other modes."""

    def __init__(self, cfg: AugmentConfig, img_size: int, shared_crop: bool = False, geometry: bool = False):
        self.specs = barlow_twins_views(cfg, img_size)
        self.device_views = DeviceViews(cfg, self.specs)
        self.shared_crop = shared_crop
        self.geometry = geometry

    load = staticmethod(read_encoded)
    collate = staticmethod(collate_encoded)

    def __call__(self, encoded: EncodedImage) -> dict:
        first = draw_view(self.specs[0], encoded.height, encoded.width, self.geometry)
        if self.shared_crop:
            second = shared_view(first, self.specs[1])
        else:
            second = draw_view(self.specs[1], encoded.height, encoded.width, self.geometry)
        return {"encoded": encoded, "views": [first, second]}

    def finish_batch(self, batch: dict) -> tuple[Tensor, ...]:
        x1, x2 = self.device_views(batch)
        if self.geometry:
            return x1, x2, batch["views"][0]["geometry"], batch["views"][1]["geometry"]
        return x1, x2


class EncodedSegmentationTransform:
    """``--aug.device gpu_full`` for segmentation training: the same crop box and flip as
    :func:`datamodules.transforms.segmentation_train_transform` (bilinear, antialiased), the image decoded
    and cropped on the device, the mask (decoded on the CPU in the worker) cropped there with nearest
    neighbours. :meth:`finish_batch` → ``(images, masks)``: normalised float32 (B, 3, S, S), int64 (B, S, S)."""

    def __init__(self, img_size: int, crop_scale_min: float, hflip_prob: float):
        from torchvision.transforms import v2

        crop = CropFlip.of(v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True), hflip_prob)
        self.spec = DeviceViewSpec(img_size, crop, "bilinear", None)
        self.device_views = DeviceViews(None, [self.spec])

    load = staticmethod(read_encoded)
    collate = staticmethod(collate_encoded)

    def __call__(self, encoded: EncodedImage, mask: Tensor) -> dict:
        return {"encoded": encoded, "mask": mask, "views": [draw_view(self.spec, encoded.height, encoded.width, False)]}

    def finish_batch(self, batch: dict) -> tuple[Tensor, Tensor]:
        (images,) = self.device_views(batch)
        view = batch["views"][0]
        masks = nearest_crops(batch["mask"].to(view["box"].device), view["box"], view["flip"], self.spec.size)
        return images, masks.long()


class EncodedMultiCropTransform:
    """``--aug.device gpu_full`` for DINO's multi-crop (datamodules/multicrop.py): the views of
    :func:`datamodules.multicrop.multicrop_views`, each drawn as :class:`~datamodules.multicrop.MultiCropTransform`
    draws it (view after view: crop and flip by :func:`~datamodules.multicrop.view_crop`, then the photometric
    parameters), decoded once per image and cropped on the device, the globals and the locals each in one
    resampling call. :meth:`finish_batch` → the list of normalised views, as the other multi-crop modes."""

    def __init__(self, aug: AugmentConfig, img_size: int, dino, local_size: int):
        self.views = multicrop_views(aug, img_size, dino, local_size)
        self.specs = [DeviceViewSpec(view.size, view_crop(aug, view), aug.crop_interpolation,
                                     PhotometricSampler(aug, view.blur_prob, view.solarize_prob)) for view in self.views]
        self.device_views = DeviceViews(aug, self.specs)

    load = staticmethod(read_encoded)
    collate = staticmethod(collate_encoded)

    def __call__(self, encoded: EncodedImage) -> dict:
        return {"encoded": encoded, "views": [draw_view(spec, encoded.height, encoded.width, False) for spec in self.specs]}

    def finish_batch(self, batch: dict) -> list[Tensor]:
        return self.device_views(batch)


def augment_mode(cfg: AugmentConfig) -> str:
    """``aug.device``, with the older ``aug.gpu=true`` meaning ``gpu_photometric``."""
    if cfg.device == "cpu" and cfg.gpu:
        return "gpu_photometric"
    return cfg.device


__all__ = ["EncodedImage", "EncodedBatch", "DeviceViewSpec", "DeviceViews", "EncodedTwoViewTransform",
           "EncodedSegmentationTransform", "EncodedMultiCropTransform", "read_encoded", "collate_encoded", "decode_images", "resized_crops",
           "resample_matrices", "nearest_crops", "augment_mode"]
