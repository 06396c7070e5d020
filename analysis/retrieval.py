"""Dense nearest-neighbour retrieval ("Hummingbird"): how well a backbone's patch features carry semantics.

Balažević et al., "Towards In-context Scene Understanding" (NeurIPS 2023), as its open re-implementation
builds it (github.com/vpariza/open-hummingbird-eval, ``hbird/hbird_eval.py``), step by step:

1. **Memory.** Every training image (VOC12 ``trainaug``, 10,582 images; ``SegmentationClassAug`` masks) is
   augmented (:func:`memory_transform`: colour jitter, then one random resized crop of image and mask to
   ``input_size``) for ``augmentation_epochs`` passes. Its patch features (the last block's normalised patch
   tokens of a ViT; a ResNet's last feature map) are stored L2-normalised with their **label fractions**:
   for each class, the fraction of the patch's pixels of that class, void (255) counted as background (0).
2. **Bounded memory.** With ``memory_size`` patches in all, each image contributes
   ``K = max(1, memory_size // (images · epochs))`` patches (:func:`sample_patches`): a patch scores the sum,
   over the classes present in it, of the number of the image's patches holding that class, times a uniform
   random number; the K lowest scores are kept — patches of rare classes first.
3. **Retrieval.** Each validation patch (images and masks resized to ``input_size``) takes its ``k = 30``
   nearest memory patches by cosine similarity (exact search) and the average of their label fractions
   weighted by ``softmax(cos / 0.02)`` (:func:`retrieve_labels`).
4. **Prediction.** The (h, w, C) label distributions are upsampled bilinearly to ``input_size`` and the
   argmax taken; **mIoU** over the classes against the resized masks, void ignored (:class:`ConfusionMatrix`).

The re-implementation's ``PredsmIoU`` matches predicted to ground-truth classes with the Hungarian method
before computing the IoU; predictions here already carry class ids, so :meth:`ConfusionMatrix.miou` reports
both the plain mIoU (classes with a non-empty union) and the matched one (``matching="hungarian"``). On VOC12
val, where every class occurs, the plain mean is over all 21 classes as there.

Differences from the re-implementation, chosen: images are normalised with ImageNet's statistics
(0.229, 0.224, 0.225; the re-implementation's transforms file has 0.255 for the blue channel, a typo); the
exact k-NN search (its ScaNN/faiss-GPU backends are approximate or exact depending on their settings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.errors import DataError
from datamodules.segmentation import load_mask

__all__ = ["ConfusionMatrix", "Memory", "MemoryBuilder", "RetrievalImages", "RetrievalScore", "faiss_index",
           "hummingbird", "label_fractions", "nearest_neighbours", "memory_transform", "patchify", "retrieve_labels",
           "sample_patches", "per_image_samples", "upsampled_prediction", "val_transform"]

VOID = 255
KNN_BACKENDS = ("torch", "faiss")


def _faiss():
    try:
        import faiss  # optional: pip install faiss-cpu
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    return _faiss() is not None


def faiss_index(memory: Tensor):
    """An exact inner-product faiss index (``IndexFlatIP``, CPU) holding ``memory`` (M, D)."""
    faiss = _faiss()
    if faiss is None:
        raise ValueError("the faiss k-NN backend needs the faiss package (pip install faiss-cpu)")
    index = faiss.IndexFlatIP(memory.shape[1])
    index.add(np.ascontiguousarray(memory.float().cpu().numpy()))
    return index


def nearest_neighbours(query: Tensor, memory: Tensor, k: int, chunk_queries: int = 4096,
                       chunk_memory: int = 262_144, backend: str = "torch", index=None) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of L2-normalised ``query`` (Q, D) with ``memory`` (M, D): (Q, k) similarities
    (descending) and memory indices. ``torch``: on ``memory``'s device, in blocks of ``chunk_queries`` ×
    ``chunk_memory`` similarities at a time (bounded memory whatever M), a running top-k merged block by block;
    ``faiss``: an exact ``IndexFlatIP`` on the CPU (``index`` from :func:`faiss_index`, built here if None)."""
    if backend not in KNN_BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; valid: {', '.join(KNN_BACKENDS)}")
    if not 1 <= k <= memory.shape[0]:
        raise ValueError(f"k={k} neighbours asked for but the memory holds {memory.shape[0]} patches")
    if backend == "faiss":
        index = faiss_index(memory) if index is None else index
        sims, idx = index.search(np.ascontiguousarray(query.float().cpu().numpy()), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()
    device = memory.device
    out_sims, out_idx = [], []
    for q0 in range(0, query.shape[0], chunk_queries):
        q = query[q0:q0 + chunk_queries].to(device=device, dtype=memory.dtype)
        best_sims = best_idx = None
        for m0 in range(0, memory.shape[0], chunk_memory):
            sims = q @ memory[m0:m0 + chunk_memory].T
            top = min(k, sims.shape[1])
            s, i = sims.topk(top, dim=1)
            i = i + m0
            if best_sims is not None:
                s, j = torch.cat([best_sims, s], dim=1).topk(min(k, best_sims.shape[1] + top), dim=1)
                i = torch.cat([best_idx, i], dim=1).gather(1, j)
            best_sims, best_idx = s, i
        out_sims.append(best_sims.float())
        out_idx.append(best_idx)
    return torch.cat(out_sims), torch.cat(out_idx)


def retrieve_labels(query: Tensor, memory: Tensor, memory_labels: Tensor, k: int = 30, temperature: float = 0.02,
                    backend: str = "torch", chunk_queries: int = 4096, chunk_memory: int = 262_144,
                    index=None) -> Tensor:
    """(Q, C) label distributions of ``query`` (Q, D) patches: their ``k`` nearest ``memory`` (M, D) patches by
    cosine similarity (both normalised here; exact search, :func:`nearest_neighbours`), whose ``memory_labels``
    (M, C) are averaged with weights ``softmax(cos / temperature)`` — the re-implementation's
    ``_find_nearest_key_to_query`` + ``_cross_attention``. ``index``: a :func:`faiss_index` of the normalised
    memory, reused across calls (``backend="faiss"``)."""
    if query.ndim != 2 or memory.ndim != 2 or query.shape[1] != memory.shape[1]:
        raise ValueError(f"query (Q, D) and memory (M, D) must share D; got {tuple(query.shape)} and "
                         f"{tuple(memory.shape)}")
    if memory_labels.shape[0] != memory.shape[0]:
        raise ValueError(f"{memory.shape[0]} memory patches but {memory_labels.shape[0]} label rows")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(query.float(), dim=-1)
    m = F.normalize(memory, dim=-1) if memory.dtype in (torch.float32, torch.float64) \
        else F.normalize(memory.float(), dim=-1).to(memory.dtype)
    _, idx = nearest_neighbours(q, m, k, chunk_queries, chunk_memory, backend, index)
    idx = idx.to(memory.device)
    neighbours = m[idx.flatten()].float().reshape(idx.shape[0], k, -1)  # recomputed in float32 as the reference
    sims = torch.einsum("qd,qkd->qk", q.to(memory.device), neighbours)
    weights = (sims / temperature).softmax(dim=-1)
    labels = memory_labels[idx.flatten()].float().reshape(idx.shape[0], k, -1)
    return torch.einsum("qk,qkc->qc", weights, labels)


# -- labels and sampling -------------------------------------------------------------------------------------
def patchify(labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H, W) integer label maps → (B, h·w, p_h·p_w) the pixels of each patch of the ``grid`` (H = h·p_h)."""
    b, height, width = labels.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"label maps of {height}x{width} do not split into a {h}x{w} grid")
    ph, pw = height // h, width // w
    return labels.reshape(b, h, ph, w, pw).permute(0, 1, 3, 2, 4).reshape(b, h * w, ph * pw)


def label_fractions(labels: Tensor, grid: tuple[int, int], num_classes: int) -> Tensor:
    """(B, h·w, C) fraction of each patch's pixels in each class; void (255) counts as background (0)."""
    labels = torch.where(labels == VOID, torch.zeros_like(labels), labels).long()
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ValueError(f"label ids must be in 0..{num_classes - 1} or {VOID}, got {int(labels.min())}.."
                         f"{int(labels.max())}")
    patches = patchify(labels, grid)
    return F.one_hot(patches, num_classes).float().mean(dim=2)


def per_image_samples(memory_size: int, images: int, epochs: int) -> int:
    """Patches each image contributes to a bounded memory (the reference's ``num_sampled_features``)."""
    return max(1, memory_size // max(1, images * epochs))


def sample_patches(fractions: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(B, k) indices of the patches kept per image: score = Σ over the classes present in a patch of the number
    of the image's patches holding that class, times U(0, 1) (one draw per patch, images in order, from
    ``generator`` on the CPU); the k lowest. ``fractions`` (B, N, C) from :func:`label_fractions`."""
    presence = fractions > 0
    class_count = presence.sum(dim=1).float()  # (B, C) patches holding each class
    scores = torch.einsum("bnc,bc->bn", presence.float(), class_count).cpu()
    nonempty = presence.any(dim=2).cpu()
    scores = scores.masked_fill(~nonempty, 1e6)
    noise = torch.rand(int(nonempty.sum()), generator=generator)
    scores[nonempty] *= noise  # boolean indexing is row-major: image by image, as the reference draws
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"cannot keep {k} patches of an image of {scores.shape[1]}")
    return scores.topk(k, dim=1, largest=False).indices


@dataclass
class Memory:
    """The memory bank: ``features`` (M, D) L2-normalised, ``labels`` (M, C) label fractions."""
    features: Tensor
    labels: Tensor


class MemoryBuilder:
    """Collects (features, label maps) batches into a :class:`Memory`, bounded (``memory_size`` patches, split
    evenly over ``images`` × ``epochs``) or not (``memory_size`` None: every patch)."""

    def __init__(self, num_classes: int, memory_size: Optional[int] = None, images: int = 0, epochs: int = 1,
                 generator: Optional[torch.Generator] = None, store_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.num_classes, self.memory_size, self.generator = num_classes, memory_size, generator
        self.per_image = per_image_samples(memory_size, images, epochs) if memory_size is not None else None
        self.store_dtype, self.device = store_dtype, torch.device(device)
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []

    def add(self, features: Tensor, labels: Tensor, grid: tuple[int, int]) -> None:
        """``features`` (B, h·w, D) patch features, ``labels`` (B, H, W) label maps at the input size."""
        fractions = label_fractions(labels.to(features.device), grid, self.num_classes)
        normalised = features.float() / features.float().norm(dim=2, keepdim=True)  # no eps, as the reference
        if self.per_image is not None:
            idx = sample_patches(fractions, self.per_image, self.generator).to(features.device)
            normalised = normalised.gather(1, idx[..., None].expand(-1, -1, normalised.shape[-1]))
            fractions = fractions.gather(1, idx[..., None].expand(-1, -1, fractions.shape[-1]))
        self.features.append(normalised.flatten(0, 1).to(self.device, self.store_dtype))
        self.labels.append(fractions.flatten(0, 1).to(self.device, torch.float16 if self.store_dtype == torch.float16
                                                      else torch.float32))

    def build(self) -> Memory:
        return Memory(torch.cat(self.features), torch.cat(self.labels))


# -- prediction and score ------------------------------------------------------------------------------------
def upsampled_prediction(distributions: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, h·w, C) label distributions → (B, H, W) class ids: bilinear upsampling (align_corners False) of the
    (B, C, h, w) maps to ``size``, then the argmax over classes."""
    b, n, c = distributions.shape
    maps = distributions.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2).float()
    return F.interpolate(maps, size=tuple(size), mode="bilinear").argmax(dim=1)


class ConfusionMatrix:
    """Streaming (C, C) confusion counts (rows ground truth, columns prediction), ``ignore`` pixels left out."""

    def __init__(self, num_classes: int, ignore: int = VOID):
        self.num_classes, self.ignore = num_classes, ignore
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: Tensor, prediction: Tensor) -> None:
        target, prediction = target.reshape(-1).long().cpu(), prediction.reshape(-1).long().cpu()
        keep = target != self.ignore
        target, prediction = target[keep], prediction[keep]
        if target.numel() and int(target.max()) >= self.num_classes:
            raise ValueError(f"a ground-truth label is >= {self.num_classes} (and not {self.ignore})")
        self.counts += torch.bincount(target * self.num_classes + prediction,
                                      minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def per_class_iou(self, matching: str = "none") -> Tensor:
        """(C,) IoU per class; NaN where a class is in neither the ground truth nor the prediction.
        ``hungarian``: predicted classes first assigned one-to-one to ground-truth classes maximising the total
        IoU (scipy's linear_sum_assignment on 1 − IoU, as the re-implementation's ``PredsmIoU``)."""
        counts = self.counts.double()
        if matching == "hungarian":
            from scipy.optimize import linear_sum_assignment

            union = counts.sum(1, keepdim=True) + counts.sum(0, keepdim=True) - counts
            iou = counts / union.clamp(min=1e-8)
            rows, cols = linear_sum_assignment(1.0 - iou.numpy())
            mapping = torch.zeros(self.num_classes, dtype=torch.long)
            mapping[torch.from_numpy(cols)] = torch.from_numpy(rows).long()
            counts = torch.zeros_like(counts).index_add_(1, mapping, counts)
        elif matching != "none":
            raise ValueError(f"unknown matching {matching!r}; valid: none, hungarian")
        tp = counts.diag()
        union = counts.sum(0) + counts.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self, matching: str = "none") -> float:
        """Mean IoU over the classes with a non-empty union (NaN when no pixel was counted)."""
        iou = self.per_class_iou(matching)
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if valid.any() else float("nan")


# -- the protocol's image transforms -------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_input(image) -> Tensor:
    from torchvision.transforms import functional as TF

    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def val_transform(image, mask, input_size: int) -> tuple[Tensor, Tensor]:
    """PIL image and mask → the re-implementation's validation input: image resized to input_size² (bilinear,
    antialiased, on the PIL image), ``ToTensor`` + normalisation; mask resized as a tensor with torch's nearest
    neighbours (source pixel floor(i · in / out), which is not PIL's nearest); (3, S, S) float and (S, S) int64."""
    from torchvision.transforms import functional as TF

    image = TF.resize(image, [input_size, input_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    target = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())[None]
    target = TF.resize(target, [input_size, input_size], interpolation=TF.InterpolationMode.NEAREST)
    return _to_input(image), target[0].long()


def memory_transform(image, mask, input_size: int, generator: torch.Generator,
                     scale: tuple[float, float] = (0.5, 2.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                     jitter: float = 0.1, jitter_p: float = 0.5) -> tuple[Tensor, Tensor]:
    """The memory images' augmentation: brightness, contrast, saturation, hue jitter (each ±``jitter``, each
    applied with probability ``jitter_p``), normalisation, then one random resized crop of image and mask
    (torchvision's ``RandomResizedCrop.get_params`` with ``scale`` (0.5, 2.0) — a crop that cannot fit falls back
    to the central one — resized to input_size², bilinear antialiased / nearest). Random numbers come from
    ``generator``."""
    from torchvision.transforms import functional as TF

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=generator))

    def coin() -> bool:
        return float(torch.rand(1, generator=generator)) < jitter_p

    if coin():
        image = TF.adjust_brightness(image, uniform(1 - jitter, 1 + jitter))
    if coin():
        image = TF.adjust_contrast(image, uniform(1 - jitter, 1 + jitter))
    if coin():
        image = TF.adjust_saturation(image, uniform(1 - jitter, 1 + jitter))
    if coin():
        image = TF.adjust_hue(image, uniform(-jitter, jitter))
    tensor = _to_input(image)
    target = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())[None]
    top, left, h, w = _crop_params(tensor.shape[-2], tensor.shape[-1], scale, ratio, generator)
    tensor = TF.resized_crop(tensor, top, left, h, w, [input_size, input_size],
                             interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    target = TF.resized_crop(target, top, left, h, w, [input_size, input_size],
                             interpolation=TF.InterpolationMode.NEAREST)
    return tensor, target[0].long()


def _crop_params(height: int, width: int, scale, ratio, generator) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with an explicit generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator))
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# -- the whole protocol over image files ---------------------------------------------------------------------
class RetrievalImages(torch.utils.data.Dataset):
    """(image, mask) files as the protocol feeds them: ``val`` resized (:func:`val_transform`); ``memory``
    augmented (:func:`memory_transform`) with random numbers from (seed, epoch, index) alone, so the memory
    does not depend on the number of loader workers."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], input_size: int, num_classes: int, mode: str,
                 seed: int = 0):
        self.pairs, self.input_size, self.num_classes = list(pairs), input_size, num_classes
        self.mode, self.seed = mode, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        image_path, mask_path = self.pairs[index]
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise DataError(f"cannot read image {image_path}: {err}") from None
        mask = Image.fromarray(load_mask(mask_path, self.num_classes).numpy(), "L")
        if mask.size != image.size:
            raise DataError(f"mask {mask_path} is {mask.size[1]}x{mask.size[0]} but its image is "
                            f"{image.size[1]}x{image.size[0]}")
        if self.mode == "val":
            return val_transform(image, mask, self.input_size)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2 ** 63))
        return memory_transform(image, mask, self.input_size, generator)


@dataclass
class RetrievalScore:
    miou: float
    """Mean IoU over the classes (predicted class ids taken as they are)."""
    miou_hungarian: float
    """Mean IoU after the re-implementation's Hungarian matching of predicted to ground-truth classes."""
    per_class: Tensor
    memory_patches: int
    val_images: int
    examples: list[tuple[Tensor, Tensor, Tensor]]
    """A few (normalised image, ground truth, prediction) triples, for pictures."""


@torch.no_grad()
def hummingbird(features: Callable[[Tensor], Tensor], memory_pairs: Sequence[tuple[Path, Path]],
                val_pairs: Sequence[tuple[Path, Path]], input_size: int, grid: tuple[int, int], num_classes: int = 21,
                memory_size: Optional[int] = 102_400, epochs: int = 1, k: int = 30, temperature: float = 0.02,
                seed: int = 0, batch_size: int = 16, num_workers: int = 0, device: torch.device | str = "cpu",
                backend: str = "torch", store_dtype: torch.dtype = torch.float32, keep_examples: int = 0,
                log: Optional[Callable[[str], None]] = None) -> RetrievalScore:
    """The protocol of the module docstring. ``features(x)`` maps a (B, 3, S, S) batch on ``device`` to (B, h·w, D)
    patch features on the ``grid`` (h, w); ``memory_pairs`` / ``val_pairs`` (image, mask) files; the memory bank
    is kept on ``device`` (``store_dtype`` float16 halves it) and searched there."""
    from torch.utils.data import DataLoader

    device = torch.device(device)
    memory_set = RetrievalImages(memory_pairs, input_size, num_classes, "memory", seed)
    builder = MemoryBuilder(num_classes, memory_size, len(memory_set), epochs,
                            torch.Generator().manual_seed(seed), store_dtype, device)
    for epoch in range(epochs):
        memory_set.epoch = epoch
        for images, labels in DataLoader(memory_set, batch_size=batch_size, num_workers=num_workers):
            builder.add(features(images.to(device)), labels.to(device), grid)
        if log:
            log(f"memory: pass {epoch + 1}/{epochs}, {sum(len(f) for f in builder.features)} patches")
    memory = builder.build()
    index = faiss_index(memory.features) if backend == "faiss" else None  # built once for every query batch
    confusion = ConfusionMatrix(num_classes)
    examples: list[tuple[Tensor, Tensor, Tensor]] = []
    val_set = RetrievalImages(val_pairs, input_size, num_classes, "val", seed)
    for images, labels in DataLoader(val_set, batch_size=batch_size, num_workers=num_workers):
        feats = features(images.to(device))
        dist = retrieve_labels(feats.reshape(-1, feats.shape[-1]), memory.features, memory.labels, k, temperature,
                               backend, index=index)
        prediction = upsampled_prediction(dist.reshape(feats.shape[0], feats.shape[1], -1).cpu(), grid,
                                          tuple(labels.shape[-2:]))
        confusion.update(labels, prediction)
        for triple in zip(images, labels, prediction):
            if len(examples) < keep_examples:
                examples.append(triple)
    return RetrievalScore(confusion.miou(), confusion.miou("hungarian"), confusion.per_class_iou(),
                          memory.features.shape[0], len(val_set), examples)
