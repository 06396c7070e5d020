"""Pascal VOC 2012 on disk: the folder layout, split lists, and the dataset source ``voc`` (the generated
VOC-layout source ``synthetic`` is registered beside its generator, ``datamodules/synthetic_voc.py``).

Layout (as torchvision's VOCSegmentation reads it)::

    <root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    <root>/VOCdevkit/VOC2012/SegmentationClass/<id>.png
    <root>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
"""
from __future__ import annotations

import logging
from pathlib import Path

from config.hparams import DataConfig
from datamodules.errors import DataError
from datamodules.registry import DATASETS
from utils.downloads import connection_problem, one_line

log = logging.getLogger(__name__)

VOC_SUBDIR = Path("VOCdevkit") / "VOC2012"

# Class ids 0..20 of the segmentation masks (255 marks the void border and is ignored).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_dir(root: str | Path) -> Path:
    return Path(root) / VOC_SUBDIR


def is_voc_root(root: str | Path) -> bool:
    d = voc_dir(root)
    return (d / "JPEGImages").is_dir() and (d / "ImageSets" / "Segmentation").is_dir()


def read_split(root: str | Path, split: str) -> list[str]:
    """Image ids of a segmentation split ('train', 'val', 'trainval')."""
    path = voc_dir(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"split file {path} is missing")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def image_path(root: str | Path, image_id: str) -> Path:
    return voc_dir(root) / "JPEGImages" / f"{image_id}.jpg"


def all_image_ids(root: str | Path) -> list[str]:
    return sorted(p.stem for p in (voc_dir(root) / "JPEGImages").glob("*.jpg"))


def existing_image_paths(root: str | Path, ids: list[str]) -> list[Path]:
    paths = [image_path(root, i) for i in ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} listed image(s) missing, e.g. {missing[0]}")
    return paths


class VOCSource:
    """The real dataset under ``data.root``, downloaded with torchvision when asked and missing."""

    @staticmethod
    def check(cfg: DataConfig) -> str | None:
        """Problem with the config that would stop the run, checked before anything is loaded."""
        if cfg.download or is_voc_root(cfg.root):
            return None
        if not Path(cfg.root).exists():
            return (f"--data.root: {cfg.root!r} does not exist; point it at the folder holding "
                    f"VOCdevkit/VOC2012, set --data.download=true, or use --data.dataset=synthetic")
        return (f"--data.root: {cfg.root!r} has no {VOC_SUBDIR}/JPEGImages and ImageSets/Segmentation; "
                f"point it at the folder holding VOCdevkit/VOC2012 or set --data.download=true")

    @staticmethod
    def prepare(cfg: DataConfig) -> Path:
        if not is_voc_root(cfg.root):
            if not cfg.download:
                raise DataError(VOCSource.check(cfg) or f"no VOC 2012 under {cfg.root}")
            download_voc(Path(cfg.root))
        return Path(cfg.root)


def download_voc(root: Path) -> None:
    """torchvision's VOC 2012 download and extraction into ``root``, failing in one line (--data.download).

    The archive already in ``root`` (VOCtrainval_11-May-2012.tar, MD5-checked) is extracted with no network.
    Otherwise one quick connection attempt (utils.downloads) comes first: urllib has no timeout, and a
    machine without network would otherwise wait minutes and end in a traceback.
    """
    import tarfile

    from torchvision.datasets.utils import check_integrity
    from torchvision.datasets.voc import DATASET_YEAR_DICT, VOCSegmentation

    entry = DATASET_YEAR_DICT["2012"]
    url, archive = entry["url"], root / entry["filename"]
    offline = (f"offline: point --data.root at a folder holding {VOC_SUBDIR}, or put the archive "
               f"{entry['filename']} into {root} and run again")
    root.mkdir(parents=True, exist_ok=True)
    if not (archive.is_file() and check_integrity(str(archive), entry["md5"])):
        problem = connection_problem(url)
        if problem:
            what = (f"{archive} is incomplete or damaged (its MD5 differs) and cannot be downloaded again"
                    if archive.is_file() else f"cannot download Pascal VOC 2012 ({entry['filename']}, 2 GB)")
            raise DataError(f"--data.download: {what} from {url}: {problem}; {offline}")
        log.info("downloading Pascal VOC 2012 from %s into %s (about 2 GB)", url, root)
    try:
        VOCSegmentation(str(root), year="2012", image_set="train", download=True)
    except (OSError, RuntimeError, tarfile.TarError) as err:  # network, disk, a damaged download
        raise DataError(f"--data.download: getting Pascal VOC 2012 from {url} into {root} failed: "
                        f"{one_line(err, 200)}; {offline}") from None
    if not is_voc_root(root):
        raise DataError(f"--data.download: {archive} was extracted but {voc_dir(root)} has no JPEGImages and "
                        f"ImageSets/Segmentation; {offline}")


DATASETS.register("voc")(VOCSource)
