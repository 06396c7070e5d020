"""Emerging properties of any backbone, measured as the field measures them, in one command:

* ``jaccard`` — DINO's attention Jaccard (:mod:`analysis.emergence`; ViT-S/16 on VOC12 val: 45.9 DINO, 27.3
  supervised, 22.0 random weights; a fraction here, 0.459);
* ``corloc`` — unsupervised single-object discovery from the last block's keys, LOST and TokenCut, scored by
  CorLoc on a VOC detection split (:mod:`analysis.discovery`; DINO ViT-S/16: LOST 61.9 / 64.0, TokenCut
  68.8 / 72.1 on VOC07 / VOC12 trainval);
* ``hummingbird`` — dense nearest-neighbour retrieval, mIoU on VOC12 val with a memory bank built from
  trainaug (:mod:`analysis.retrieval`; DINO ViT-S/16 at 512 px: 37.2 / 43.1 / 46.6 with 102,400 / 1,024,000 /
  10,240,000 memory patches).

    python -m tools.emergence --backbone.name vit_small_patch16_224.dino --backbone.pretrained true \\
        --data.root /datasets/voc                                # timm weights (online once)
    python -m tools.emergence --backbone.name vit_small_patch16_224 --backbone.weights dino_deitsmall16_pretrain.pth \\
        --data.root /datasets/voc                                # a local weight file (DINO's official .pth)
    python -m tools.emergence --backbone.name vit_small_patch16_224 --data.root /datasets/voc \\
        --backbone.weights runs/<run>/checkpoints/last.ckpt      # one of our checkpoints (DINO: its teacher)
    python -m tools.emergence --config runs/<run>/config.yaml --backbone.weights runs/<run>/checkpoints/last.ckpt

Flags: main.py's (``--config``, ``--backbone.*``, ``--data.*``; ``--callbacks.jaccard_protocol`` dino|strict,
``--callbacks.attention_keep`` 0.6, ``--callbacks.emergence_img_size`` 512; ``--data.batch_size`` images per
forward pass, ``--data.num_workers``; ``--log.output_dir``/``--log.run_name``; ``--seed``), plus this program's
own (``python -m tools.emergence --help``): ``--metrics`` (default all three), ``--split`` and ``--num-images``
(0 = every image of each metric's evaluation split, else that many, evenly spaced), CorLoc's ``--corloc-year``
2007|2012 and ``--corloc-split`` (trainval), ``--no-hard``, retrieval's ``--memory-size`` (102400),
``--memory-split`` (trainaug), ``--augmentation-epochs`` (2), ``--hummingbird-img-size`` (512), ``--knn``
torch|faiss, and ``--baseline`` (true: the same protocols on the same architecture with random weights, printed
beside each number).

A ResNet backbone has no keys or attention: asking it for ``jaccard`` or ``corloc`` is a one-line error, and
``--metrics=hummingbird`` runs retrieval on its last feature map (stride 32).

Writes, in a fresh run directory ``<output_dir>/<run_name>`` (default ``emergence-<backbone>-<time>``):
``suite.csv`` and ``suite.md`` (metric, value, random-init value, published value for that backbone where one
exists, protocol), ``emergence_grid.png`` (images with ground-truth, LOST and TokenCut boxes and seeds;
retrieval predictions beside the ground truth), for ``jaccard`` also ``emergence.csv`` and ``emergence.md``
(the best-head Jaccard and each head's own, the number of images and objects), ``config.yaml`` (main.py's flags
as resolved) and ``code/``; prints the headline numbers. Exit status 0; 2 for a configuration error (one line,
before any data or model is touched), 1 for a data or weight file that cannot be used (one line, before any
image is scored).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import logging
import math
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from config.loading import ConfigError, parse_config, save_config
from config.validation import validate
from utils.run_dir import save_code_state

if TYPE_CHECKING:
    from analysis.emergence import EmergenceScore

log = logging.getLogger("tools.emergence")

SPLITS = ("val", "train", "trainval")
METRICS = ("jaccard", "corloc", "hummingbird")
KEY_METRICS = ("jaccard", "corloc")  # read a ViT's attention or keys
CSV_FILE, MD_FILE = "emergence.csv", "emergence.md"
SUITE_CSV, SUITE_MD, GRID_FILE = "suite.csv", "suite.md", "emergence_grid.png"
MEMORY_SPLITS = ("trainaug", "train")
NUM_CLASSES = 21

# Published numbers of DINO's ViT-S/16 (fractions): the Jaccard from DINO's paper (dino protocol, keep 0.6,
# VOC12 val at 512 px; random weights 22.0), CorLoc from the LOST and TokenCut papers (trainval splits), the
# retrieval mIoU from the open Hummingbird re-implementation (512 px, two augmentation passes; by memory size).
DINO_VIT_S16 = {
    "jaccard": 0.459,
    "corloc_lost": {"2007": 0.619, "2012": 0.640},
    "corloc_tokencut": {"2007": 0.688, "2012": 0.721},
    "hummingbird_miou": {102_400: 0.372, 1_024_000: 0.431, 10_240_000: 0.466},
}
RANDOM_VIT_S16_JACCARD = 0.220


@dataclass
class Result:
    run_dir: Path
    score: Optional["EmergenceScore"]
    protocol: str
    split: str
    rows: list["SuiteRow"] = field(default_factory=list)


@dataclass
class SuiteRow:
    metric: str
    value: float
    random_init: Optional[float]
    published: Optional[float]
    protocol: str


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.emergence", allow_abbrev=False,
        description="Emerging properties of a backbone: DINO's attention Jaccard, CorLoc of LOST and TokenCut, and "
                    "Hummingbird dense-retrieval mIoU, each beside the same protocol on random weights. Also takes "
                    "main.py's flags for the backbone, data, callbacks.jaccard_protocol/attention_keep/"
                    "emergence_img_size, seed and log (see python main.py --help).")
    parser.add_argument("--metrics", default=",".join(METRICS),
                        help="comma-separated subset of jaccard, corloc, hummingbird (default: all three)")
    parser.add_argument("--split", default="val",
                        help="Jaccard: VOC segmentation split: val (default), train or trainval")
    parser.add_argument("--num-images", type=int, default=0,
                        help="score at most this many images of each metric's evaluation split, evenly spaced "
                             "(0 = all, default)")
    parser.add_argument("--corloc-year", default="2012",
                        help="CorLoc: VOC year whose detection layout is read, 2007 or 2012 (default 2012), under "
                             "<data.root>/VOCdevkit/VOC<year>")
    parser.add_argument("--corloc-split", default="trainval", help="CorLoc: ImageSets/Main split (default trainval)")
    parser.add_argument("--no-hard", action="store_true",
                        help="CorLoc: drop difficult and truncated boxes, and the images left without one "
                             "(LOST's --no_hard)")
    parser.add_argument("--k-patches", type=int, default=100, help="LOST: lowest-degree patches expanded (100)")
    parser.add_argument("--tau", type=float, default=0.2, help="TokenCut: cosine threshold of an edge (0.2)")
    parser.add_argument("--memory-size", type=int, default=102_400,
                        help="Hummingbird: memory-bank patches (102400; published: 102400, 1024000, 10240000)")
    parser.add_argument("--memory-split", default="trainaug",
                        help="Hummingbird: images of the memory bank, trainaug (default; SegmentationClassAug masks) "
                             "or train (SegmentationClass)")
    parser.add_argument("--memory-images", type=int, default=0,
                        help="Hummingbird: use at most this many memory images, evenly spaced (0 = all, default)")
    parser.add_argument("--augmentation-epochs", type=int, default=2,
                        help="Hummingbird: augmented passes over the memory images (2, as the published numbers)")
    parser.add_argument("--hummingbird-img-size", type=int, default=512,
                        help="Hummingbird: input size of memory and validation images (512)")
    parser.add_argument("--neighbours", type=int, default=30, help="Hummingbird: nearest memory patches per patch (30)")
    parser.add_argument("--temperature", type=float, default=0.02, help="Hummingbird: softmax temperature (0.02)")
    parser.add_argument("--knn", default="torch",
                        help="Hummingbird: exact k-NN search, torch (chunked, on the model's device; default) or faiss "
                             "(IndexFlatIP on the CPU; needs pip install faiss-cpu)")
    parser.add_argument("--memory-dtype", default="float32",
                        help="Hummingbird: memory-bank dtype, float32 (default) or float16 (half the memory)")
    parser.add_argument("--baseline", type=_bool, default=True,
                        help="also run every protocol on the same architecture with random weights (seed --seed) "
                             "and print it beside the result: true (default) or false")
    parser.add_argument("--grid-images", type=int, default=4, help="rows of the picture grid (4; 0 = none)")
    return parser


def selected_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(f"--metrics: {', '.join(unknown) or repr(text)} is not a list of {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def granularity(cfg) -> int:
    from models.backbones import input_granularity  # local: a config error is reported before torch loads

    return input_granularity(cfg.backbone)


def check(cfg, split: str, num_images: int, own: Optional[argparse.Namespace] = None) -> list[str]:
    """The tool's own config errors (ConfigError), before any data or model is touched; the metrics to run."""
    # local: a config error is reported before torch loads
    from datamodules.voc_detection import DETECTION_SPLITS, YEARS
    from models.backbones import is_vit, resolve_architecture

    own = own or tool_parser().parse_args([])
    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    if num_images < 0:
        raise ConfigError(f"--num-images must be >= 0 (0 = the whole split), got {num_images}")
    metrics = selected_metrics(own.metrics)
    vit = is_vit(cfg.backbone.name) and cfg.backbone.name != "pixels"
    if not vit and "jaccard" in metrics:
        raise ConfigError(f"the emergence Jaccard reads a ViT's CLS-token attention; --backbone.name="
                          f"{cfg.backbone.name} has none (use a ViT: vit, vit_small_patch16_224.dino, ...); "
                          f"--metrics=hummingbird runs on any backbone")
    if not vit and "corloc" in metrics:
        raise ConfigError(f"CorLoc (LOST, TokenCut) reads a ViT's last-block keys; --backbone.name={cfg.backbone.name} "
                          f"has none (use a ViT); --metrics=hummingbird runs on any backbone")
    if "jaccard" in metrics:
        patch = resolve_architecture(cfg.backbone)["patch_size"]
        size = cfg.callbacks.emergence_img_size
        if size % patch:
            raise ConfigError(f"--callbacks.emergence_img_size={size} is not a multiple of the patch size {patch}; "
                              f"e.g. {max(patch, size // patch * patch)}")
    if "corloc" in metrics:
        if own.corloc_year not in YEARS:
            raise ConfigError(f"--corloc-year: {own.corloc_year!r} is not one of {', '.join(YEARS)}")
        if own.corloc_split not in DETECTION_SPLITS:
            raise ConfigError(f"--corloc-split: {own.corloc_split!r} is not one of {', '.join(DETECTION_SPLITS)}")
        if own.k_patches < 1:
            raise ConfigError(f"--k-patches must be >= 1, got {own.k_patches}")
        if not 0 <= own.tau < 1:
            raise ConfigError(f"--tau must be a cosine threshold in [0, 1), got {own.tau}")
    if "hummingbird" in metrics:
        step = granularity(cfg)
        size = own.hummingbird_img_size
        if size < step:
            raise ConfigError(f"--hummingbird-img-size={size} is smaller than one {step}-px patch of "
                              f"--backbone.name={cfg.backbone.name}; use a multiple of {step}, e.g. 512")
        if size % step:
            raise ConfigError(f"--hummingbird-img-size={size} is not a multiple of {step} (the patch size or stride of "
                              f"--backbone.name={cfg.backbone.name}); e.g. {size // step * step}")
        for flag, value in (("--memory-size", own.memory_size), ("--neighbours", own.neighbours),
                            ("--augmentation-epochs", own.augmentation_epochs)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if own.memory_images < 0:
            raise ConfigError(f"--memory-images must be >= 0 (0 = all), got {own.memory_images}")
        if own.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {own.temperature}")
        if own.memory_split not in MEMORY_SPLITS:
            raise ConfigError(f"--memory-split: {own.memory_split!r} is not one of {', '.join(MEMORY_SPLITS)}")
        if own.memory_dtype not in ("float32", "float16"):
            raise ConfigError(f"--memory-dtype: {own.memory_dtype!r} is not float32 or float16")
        if own.knn not in ("torch", "faiss"):
            raise ConfigError(f"--knn: {own.knn!r} is not torch or faiss")
        if own.knn == "faiss":
            import importlib.util

            if importlib.util.find_spec("faiss") is None:
                raise ConfigError("--knn=faiss needs the faiss package (pip install faiss-cpu); "
                                  "--knn=torch needs nothing")
        if own.neighbours > own.memory_size:
            raise ConfigError(f"--neighbours={own.neighbours} is more than --memory-size={own.memory_size}")
    if own.grid_images < 0:
        raise ConfigError(f"--grid-images must be >= 0, got {own.grid_images}")
    return metrics


def default_run_name(cfg) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"emergence-{cfg.backbone.name.replace('/', '-')}-{stamp}"


def fresh_run_dir(cfg) -> Path:
    """``<output_dir>/<run_name>``, created exclusively: an existing directory is never written into (the name
    gets a numeric suffix, with a warning)."""
    out = Path(cfg.log.output_dir)
    base = cfg.log.run_name or default_run_name(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            name = base if n == 0 else f"{base}-{n}"
            try:
                (out / name).mkdir()
                break
            except FileExistsError:
                n += 1
    except OSError as err:
        raise ConfigError(f"--log.output_dir: cannot create a run directory in {out}: {err.strerror or err}") from None
    if n:
        log.warning("run directory %s already exists; writing to %s", out / base, out / name)
    cfg.log.run_name = name
    return out / name


def weights_description(cfg) -> str:
    b = cfg.backbone
    if b.weights:
        return f"weights {b.weights}"
    return "published weights (timm)" if b.pretrained else "random initialisation"


def published_values(cfg) -> dict:
    """The published numbers for this backbone (DINO's ViT-S/16 only), or {}: timm's ``vit_small_patch16_224.dino``
    with ``--backbone.pretrained``, or DINO's own file ``dino_deitsmall16_pretrain.pth``."""
    b = cfg.backbone
    timm_dino = b.name == "vit_small_patch16_224.dino" and b.pretrained and not b.weights
    official = b.name.startswith("vit_small_patch16_224") and b.weights \
        and Path(b.weights).name == "dino_deitsmall16_pretrain.pth"
    return DINO_VIT_S16 if timm_dino or official else {}


def collate(batch):
    import torch

    return torch.stack([image for image, _ in batch]), [label for _, label in batch]


class EmergenceImages:
    """(uint8 image, label map) pairs of the protocol, loaded as the reference code loads them."""

    def __init__(self, root: Path, ids: list[str], img_size: int, protocol: str):
        self.root, self.ids, self.img_size, self.protocol = root, ids, img_size, protocol

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from callbacks.emergence import load_example  # local: a config error is reported before torch loads

        return load_example(self.root, self.ids[index], self.img_size, self.protocol)


# -- the inputs of each metric, checked before anything is computed ------------------------------------------
@dataclass
class Plan:
    root: Path
    jaccard_ids: list[str] = field(default_factory=list)
    corloc_ids: list[str] = field(default_factory=list)
    memory_pairs: list[tuple[Path, Path]] = field(default_factory=list)
    val_pairs: list[tuple[Path, Path]] = field(default_factory=list)


def plan_corloc(root: Path, own, patch: int, limit: int) -> list[str]:
    # local: a config error is reported before torch loads
    from analysis.discovery import annotated_image_size
    from datamodules.barlow_twins import evenly_spaced
    from datamodules.images import DataError
    from datamodules.voc_detection import annotation_path, detection_ids, year_dir

    ids = evenly_spaced(detection_ids(root, own.corloc_year, own.corloc_split), limit)
    if not ids:
        raise DataError(f"--corloc-split={own.corloc_split}: {year_dir(root, own.corloc_year)}/ImageSets/Main/"
                        f"{own.corloc_split}.txt lists no image")
    for image_id in ids:
        xml = annotation_path(root, own.corloc_year, image_id)
        if not xml.is_file():
            raise DataError(f"CorLoc needs box annotations: {xml} is missing")
        image = year_dir(root, own.corloc_year) / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise DataError(f"image {image} is missing (listed in ImageSets/Main/{own.corloc_split}.txt)")
        height, width = annotated_image_size(xml)
        if min(height, width) < patch or math.ceil(height / patch) * math.ceil(width / patch) < 3:
            raise DataError(f"{xml}: the image is {height}x{width} px, smaller than one {patch}-px patch each way "
                            f"(TokenCut needs at least 3 patches); CorLoc reads images at their own size")
    return ids


def plan_hummingbird(root: Path, own, limit: int) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    # local: a config error is reported before torch loads
    from datamodules.barlow_twins import evenly_spaced
    from datamodules.images import DataError
    from datamodules.voc import image_path, read_split, voc_dir
    from datamodules.voc_detection import aug_mask_path, trainaug_ids

    if own.memory_split == "trainaug":
        memory = [(image_path(root, i), aug_mask_path(root, i)) for i in trainaug_ids(root)]
    else:
        memory = [(image_path(root, i), voc_dir(root) / "SegmentationClass" / f"{i}.png")
                  for i in read_split(root, "train")]
    memory = evenly_spaced(memory, own.memory_images)
    val = evenly_spaced([(image_path(root, i), voc_dir(root) / "SegmentationClass" / f"{i}.png")
                         for i in read_split(root, "val")], limit)
    for image, mask in memory + val:
        for path in (image, mask):
            if not path.is_file():
                raise DataError(f"{path} is missing (Hummingbird: --memory-split={own.memory_split} and the val split)")
    if not memory or not val:
        raise DataError(f"Hummingbird needs memory and val images under {voc_dir(root)}; found {len(memory)} "
                        f"and {len(val)}")
    return memory, val


def check_memory_size(own, memory_images: int, patches_per_image: int) -> None:
    available = memory_images * own.augmentation_epochs * patches_per_image
    if own.memory_size > available:
        raise ConfigError(f"--memory-size={own.memory_size} is larger than the {available} patches available "
                          f"({memory_images} {own.memory_split} images x {own.augmentation_epochs} passes x "
                          f"{patches_per_image} patches); use at most {available}")
    from analysis.retrieval import per_image_samples  # local: a config error is reported before torch loads

    filled = memory_images * own.augmentation_epochs * per_image_samples(own.memory_size, memory_images,
                                                                         own.augmentation_epochs)
    if own.neighbours > filled:
        raise ConfigError(f"--neighbours={own.neighbours} is more than the {filled} patches the memory holds "
                          f"(--memory-size={own.memory_size} split evenly over {memory_images} images x "
                          f"{own.augmentation_epochs} passes)")


# -- measuring -----------------------------------------------------------------------------------------------
def hummingbird_features(backbone, vit, grid: tuple[int, int]) -> Callable:
    """(B, 3, S, S) → (B, h·w, D): a ViT's normalised last-block patch tokens (DINO's position-embedding
    interpolation), or a ResNet's last feature map."""
    import torch

    from analysis.discovery import dino_vit_position_embedding  # local: a config error is reported before torch loads

    if vit is not None:
        def vit_features(x):
            with torch.no_grad(), dino_vit_position_embedding(vit, grid):
                return vit.forward_features(x)[:, vit.num_prefix_tokens:].float()
        return vit_features
    trunk = getattr(backbone, "model", backbone)

    def resnet_features(x):
        with torch.no_grad():
            x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
            x = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x))))
            return x.flatten(2).transpose(1, 2).float()
    return resnet_features


@dataclass
class Scores:
    jaccard: Optional["EmergenceScore"] = None
    corloc: Optional[object] = None
    hummingbird: Optional[object] = None


def score_backbone(backbone, cfg, own, metrics: list[str], plan: Plan, device, keep: int) -> Scores:
    import torch
    from torch.utils.data import DataLoader

    # local: a config error is reported before torch loads
    from analysis.discovery import discover
    from analysis.emergence import per_image_jaccard, summarize
    from analysis.retrieval import hummingbird
    from callbacks.emergence import attention_maps
    from datamodules.barlow_twins import default_num_workers
    from datamodules.voc_detection import annotation_path, year_dir

    vit = getattr(backbone, "vit", None)
    backbone = backbone.to(device).eval()
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers()
    scores = Scores()
    c = cfg.callbacks
    if "jaccard" in metrics:
        loader = DataLoader(EmergenceImages(plan.root, plan.jaccard_ids, c.emergence_img_size, c.jaccard_protocol),
                            batch_size=cfg.data.batch_size, num_workers=workers, collate_fn=collate)
        matrices = []
        with torch.no_grad():
            for images, labels in loader:
                attn = attention_maps(vit, images, device, c.jaccard_protocol, chunk=len(images))
                matrices += per_image_jaccard(attn, labels, c.attention_keep, c.jaccard_protocol)
                log.info("jaccard: %d / %d images", len(matrices), len(plan.jaccard_ids))
        scores.jaccard = summarize(matrices, vit.blocks[-1].attn.num_heads)
    if "corloc" in metrics:
        folder = year_dir(plan.root, own.corloc_year)
        scores.corloc = discover(vit, [folder / "JPEGImages" / f"{i}.jpg" for i in plan.corloc_ids],
                                 [annotation_path(plan.root, own.corloc_year, i) for i in plan.corloc_ids],
                                 plan.corloc_ids, device, own.no_hard, own.k_patches, own.tau, keep_records=keep,
                                 num_workers=workers)
        log.info("corloc: LOST %.4f, TokenCut %.4f on %d images", scores.corloc.lost, scores.corloc.tokencut,
                 scores.corloc.images)
    if "hummingbird" in metrics:
        step = granularity(cfg)
        grid = (own.hummingbird_img_size // step, own.hummingbird_img_size // step)
        scores.hummingbird = hummingbird(
            hummingbird_features(backbone, vit, grid), plan.memory_pairs, plan.val_pairs, own.hummingbird_img_size,
            grid, NUM_CLASSES, own.memory_size, own.augmentation_epochs, own.neighbours, own.temperature, cfg.seed,
            cfg.data.batch_size, workers, device, own.knn,
            torch.float16 if own.memory_dtype == "float16" else torch.float32, keep_examples=keep,
            log=lambda text: log.info("hummingbird: %s", text))
        log.info("hummingbird: mIoU %.4f (%d memory patches, %d val images)", scores.hummingbird.miou,
                 scores.hummingbird.memory_patches, scores.hummingbird.val_images)
    return scores


def random_backbone(cfg):
    """The same architecture with random weights, drawn from ``--seed``."""
    import torch

    from models.backbones import build_backbone  # local: a config error is reported before torch loads

    random_cfg = dataclasses.replace(cfg.backbone, pretrained=False, weights=None)
    torch.manual_seed(cfg.seed)
    return build_backbone(random_cfg, cfg.data.img_size)


def measure(cfg, split: str, num_images: int, argv: Sequence[str] = (),
            own: Optional[argparse.Namespace] = None) -> Result:
    """Build the backbone, check every input, score, write the tables. ConfigError / DataError /
    WeightLoadingError for the user's input; nothing is written before the model and the data are known to be
    usable."""
    import torch

    # local: a config error is reported before torch loads
    from analysis.emergence import label_folders
    from callbacks.emergence import emergence_ids
    from callbacks.visual import cls_attention_problem
    from datamodules import DATASETS
    from datamodules.images import DataError
    from models.backbones import build_backbone

    own = own or tool_parser().parse_args([])
    metrics = check(cfg, split, num_images, own)
    c = cfg.callbacks
    protocol = c.jaccard_protocol
    backbone = build_backbone(cfg.backbone, cfg.data.img_size)  # a bad weight file fails here
    vit = getattr(backbone, "vit", None)
    if "jaccard" in metrics:
        problem = cls_attention_problem(vit)
        if problem:
            raise ConfigError(f"--backbone.name={cfg.backbone.name}: {problem}")
    plan = Plan(DATASETS.get(cfg.data.dataset).prepare(cfg.data))
    if "jaccard" in metrics:
        plan.jaccard_ids = emergence_ids(plan.root, num_images, protocol, split)
        if not plan.jaccard_ids:
            raise DataError(f"no {split} image under {plan.root} has a {' or '.join(label_folders(protocol))} mask "
                            f"(--callbacks.jaccard_protocol={protocol})")
    if "corloc" in metrics:
        plan.corloc_ids = plan_corloc(plan.root, own, vit.patch_embed.patch_size[0], num_images)
    if "hummingbird" in metrics:
        plan.memory_pairs, plan.val_pairs = plan_hummingbird(plan.root, own, num_images)
        side = own.hummingbird_img_size // granularity(cfg)
        check_memory_size(own, len(plan.memory_pairs), side * side)

    run_dir = fresh_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    save_code_state(run_dir)
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator not in ("cpu", "mps")
    device = torch.device("cuda" if use_cuda else "cpu")
    try:
        scores = score_backbone(backbone, cfg, own, metrics, plan, device, own.grid_images)
        baseline = score_backbone(random_backbone(cfg), cfg, own, metrics, plan, device, 0) if own.baseline else None
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # an unreadable image halfway: no half-finished run left behind
        raise
    result = Result(run_dir, scores.jaccard, protocol, split)
    result.rows = suite_rows(cfg, own, scores, baseline)
    if scores.jaccard is not None:
        write_tables(result, cfg, argv)
    write_suite(result, cfg, argv)
    if own.grid_images:
        write_grid(run_dir / GRID_FILE, plan, own, scores)
    return result


def suite_rows(cfg, own, scores: Scores, baseline: Optional[Scores]) -> list[SuiteRow]:
    published = published_values(cfg)
    c = cfg.callbacks
    rows = []

    def add(metric: str, value: float, base: Optional[float], pub: Optional[float], protocol: str) -> None:
        rows.append(SuiteRow(metric, value, base, pub, protocol))

    if scores.jaccard is not None:
        random_pub = RANDOM_VIT_S16_JACCARD if published and c.jaccard_protocol == "dino" else None
        pub = published.get("jaccard") if c.jaccard_protocol == "dino" and c.attention_keep == 0.6 \
            and c.emergence_img_size == 512 else None
        add("attn_jaccard", scores.jaccard.jaccard, baseline.jaccard.jaccard if baseline else None, pub,
            f"{c.jaccard_protocol} protocol, keep {c.attention_keep:g}, {c.emergence_img_size} px, "
            f"{scores.jaccard.images} images" + (f" (random weights published: {random_pub})" if random_pub else ""))
    if scores.corloc is not None:
        split = f"VOC{own.corloc_year[2:]} {own.corloc_split}"
        for name, attr, extra in (("corloc_lost", "lost", f"k_patches {own.k_patches}"),
                                  ("corloc_tokencut", "tokencut", f"tau {own.tau:g}")):
            comparable = own.corloc_split == "trainval" and not own.no_hard
            pub = published.get(name, {}).get(own.corloc_year) if comparable else None
            add(name, getattr(scores.corloc, attr), getattr(baseline.corloc, attr) if baseline else None, pub,
                f"{split}{' no hards' if own.no_hard else ''}, {scores.corloc.images} images, {extra}")
    if scores.hummingbird is not None:
        h = scores.hummingbird
        full = own.memory_split == "trainaug" and own.memory_images == 0 and own.num_images == 0
        pub = published.get("hummingbird_miou", {}).get(own.memory_size) \
            if full and own.hummingbird_img_size == 512 and own.augmentation_epochs == 2 else None
        protocol = (f"memory {h.memory_patches} patches of {own.memory_split} x {own.augmentation_epochs} passes, "
                    f"k {own.neighbours}, T {own.temperature:g}, {own.hummingbird_img_size} px, "
                    f"{h.val_images} val images")
        add("hummingbird_miou", h.miou, baseline.hummingbird.miou if baseline else None, pub, protocol)
        add("hummingbird_miou_hungarian", h.miou_hungarian, baseline.hummingbird.miou_hungarian if baseline else None,
            None, protocol + ", classes matched (Hungarian) as the open re-implementation scores")
    return rows


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def write_suite(result: Result, cfg, argv: Sequence[str]) -> None:
    with (result.run_dir / SUITE_CSV).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "value", "random_init", "published", "protocol", "backbone", "weights"])
        for r in result.rows:
            writer.writerow([r.metric, f"{r.value:.6f}", "" if r.random_init is None else f"{r.random_init:.6f}",
                             "" if r.published is None else f"{r.published:.3f}", r.protocol, cfg.backbone.name,
                             weights_description(cfg)])
    lines = [f"# Emerging properties: {cfg.backbone.name}, {weights_description(cfg)}", "",
             f"Data: {cfg.data.root} ({cfg.data.dataset}). Fractions (0.459 = 45.9 %). `random init`: the same "
             f"protocol on the same architecture with random weights (seed {cfg.seed}).", "",
             "| metric | value | random init | published | protocol |", "|---|---|---|---|---|"]
    lines += [f"| {r.metric} | {r.value:.4f} | {_fmt(r.random_init)} | "
              f"{'' if r.published is None else f'{r.published:.3f}'} "
              f"| {r.protocol} |" for r in result.rows]
    lines += ["", f"Command: `python -m tools.emergence {' '.join(shlex.quote(a) for a in argv)}`", ""]
    (result.run_dir / SUITE_MD).write_text("\n".join(lines))


def write_grid(path: Path, plan: Plan, own, scores: Scores) -> None:
    """Rows: an image with its ground-truth boxes (green), LOST's box and seed (red) and TokenCut's (blue);
    a validation image, its ground truth and the retrieval prediction."""
    import numpy as np
    from matplotlib.patches import Rectangle
    from PIL import Image

    # local: a config error is reported before torch loads
    from datamodules.voc_detection import year_dir
    from utils.figures import subplots

    records = scores.corloc.records if scores.corloc is not None else []
    examples = scores.hummingbird.examples if scores.hummingbird is not None else []
    rows = max(len(records), len(examples))
    if not rows:
        return
    figure, axes = subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
    palette = np.random.default_rng(0).integers(0, 255, (256, 3)).astype(np.uint8)
    palette[0], palette[255] = 0, 255
    for ax in axes.flat:
        ax.axis("off")
    for row, rec in enumerate(records):
        ax = axes[row, 0]
        with Image.open(year_dir(plan.root, own.corloc_year) / "JPEGImages" / f"{rec.image_id}.jpg") as img:
            ax.imshow(np.asarray(img.convert("RGB")))
            patch = math.ceil(img.width / rec.lost.mask.shape[1])  # the grid is the padded image's
        for box in rec.gt_boxes:
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec="lime", lw=2))
        for found, colour in ((rec.lost, "red"), (rec.tokencut, "dodgerblue")):
            x0, y0, x1, y1 = found.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=2, ls="--"))
            w = found.mask.shape[1]
            ax.plot([(found.seed % w + 0.5) * patch], [(found.seed // w + 0.5) * patch], "o", color=colour, ms=5)
        ax.set_title(f"{rec.image_id}: LOST {'hit' if rec.lost_hit else 'miss'}, TokenCut "
                     f"{'hit' if rec.tokencut_hit else 'miss'}", fontsize=8)
        axes[row, 1].imshow(rec.tokencut.mask.numpy(), cmap="Blues")
        axes[row, 1].set_title("TokenCut foreground component", fontsize=8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for row, (image, target, prediction) in enumerate(examples):
        picture = np.clip(image.permute(1, 2, 0).numpy() * std + mean, 0, 1)
        overlay = palette[target.numpy().astype(np.uint8)]
        axes[row, 2].imshow(np.concatenate([picture, overlay / 255.0], axis=1))
        axes[row, 2].set_title("val image | ground truth", fontsize=8)
        axes[row, 3].imshow(palette[prediction.numpy().astype(np.uint8)])
        axes[row, 3].set_title("retrieval prediction", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def write_tables(result: Result, cfg, argv: Sequence[str]) -> None:
    score, c = result.score, cfg.callbacks
    rows = [("best", score.jaccard)] + [(str(h), float(v)) for h, v in enumerate(score.per_head)]
    with (result.run_dir / CSV_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "jaccard", "images", "skipped", "objects", "protocol", "split", "keep", "img_size",
                         "backbone"])
        for head, value in rows:
            writer.writerow([head, f"{value:.6f}", score.images, score.skipped, score.objects, result.protocol,
                             result.split, c.attention_keep, c.emergence_img_size, cfg.backbone.name])
    objects = "classes" if result.protocol == "dino" else "objects"
    lines = [
        f"# Emergence Jaccard: {cfg.backbone.name}, {weights_description(cfg)}",
        "",
        f"Protocol `{result.protocol}` (analysis/emergence.py), {result.split} split of {cfg.data.root}: "
        f"{score.images} images scored ({score.skipped} left out: no object in their mask), {score.objects} {objects}; "
        f"masks keep {c.attention_keep:g} of the attention mass; images at {c.emergence_img_size} px.",
        "",
        "| head | Jaccard |",
        "|---|---|",
        f"| best head per {objects[:-1] if objects == 'objects' else 'class'} | {score.jaccard:.4f} |",
        *(f"| {h} | {float(v):.4f} |" for h, v in enumerate(score.per_head)),
        "",
        f"Command: `python -m tools.emergence {' '.join(shlex.quote(a) for a in argv)}`",
        "",
    ]
    (result.run_dir / MD_FILE).write_text("\n".join(lines))


def one_line(err: BaseException) -> str:
    """The error's message; one raised in a DataLoader worker carries the worker's traceback, whose last line
    is the original message."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    prefix = f"{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = tool_parser().parse_known_args(argv)
    try:
        cfg = validate(parse_config(rest))
        check(cfg, own.split, own.num_images, own)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # local: a config error is reported before torch loads
    from datamodules.images import DataError
    from models.weights import WeightLoadingError

    try:
        result = measure(cfg, own.split, own.num_images, argv, own)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataError, WeightLoadingError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    s = result.score
    if s is not None:
        best_head = int(s.per_head.argmax()) if s.images else -1
        print(f"emergence Jaccard ({result.protocol} protocol, {s.images} {result.split} images, keep "
              f"{cfg.callbacks.attention_keep:g}): {s.jaccard:.4f}  (best single head {best_head}: "
              f"{float(s.per_head.max()) if s.images else float('nan'):.4f})")
    for row in result.rows:
        extra = "".join([f"  random init {row.random_init:.4f}" if row.random_init is not None else "",
                         f"  published {row.published:.3f}" if row.published is not None else ""])
        print(f"{row.metric}: {row.value:.4f}{extra}  ({row.protocol})")
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
