"""Pascal VOC's detection layout (VOC 2007 and 2012) and VOC 2012's SBD-augmented segmentation set, on disk.

Layout under a data root (as the VOC devkit archives extract; VOC 2007 beside VOC 2012)::

    <root>/VOCdevkit/VOC{2007,2012}/JPEGImages/<id>.jpg
    <root>/VOCdevkit/VOC{2007,2012}/Annotations/<id>.xml            one <object> per instance, 1-based boxes
    <root>/VOCdevkit/VOC{2007,2012}/ImageSets/Main/{train,val,trainval}.txt
    <root>/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png          class ids (the SBD-augmented masks)
    <root>/VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt    their ids (10,582 images)

Every reader here raises :class:`DataError` with one line naming the missing file or folder and what would be
valid, so that a tool can check its inputs before any model is built.
"""
from __future__ import annotations

from pathlib import Path

from datamodules.errors import DataError

__all__ = ["DETECTION_SPLITS", "YEARS", "annotation_path", "aug_mask_path", "check_detection_split",
           "check_trainaug", "detection_ids", "trainaug_ids", "year_dir"]

YEARS = ("2007", "2012")
DETECTION_SPLITS = ("train", "val", "trainval")
TRAINAUG_HELP = ("trainaug is VOC 2012's SBD-augmented segmentation set: put its SegmentationClassAug/ masks and "
                 "ImageSets/Segmentation/trainaug.txt under VOCdevkit/VOC2012 (docs/emergence.md says where to get "
                 "them)")


def year_dir(root: str | Path, year: str) -> Path:
    return Path(root) / "VOCdevkit" / f"VOC{year}"


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def check_detection_split(root: str | Path, year: str, split: str, flag: str = "--corloc-year") -> Path:
    """The split file of VOC ``year``'s detection ``split``, or DataError naming what is missing."""
    if year not in YEARS:
        raise DataError(f"{flag}: {year!r} is not one of {', '.join(YEARS)}")
    folder = year_dir(root, year)
    if not folder.is_dir():
        raise DataError(f"{flag}={year}: {folder} does not exist; CorLoc reads VOC {year}'s detection layout there "
                        f"(JPEGImages, Annotations, ImageSets/Main)")
    if not (folder / "Annotations").is_dir():
        raise DataError(f"CorLoc needs box annotations: {folder / 'Annotations'} is missing (the VOC detection "
                        f"archives hold it); leave corloc out of --metrics to skip it")
    path = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        present = [s for s in DETECTION_SPLITS if (folder / "ImageSets" / "Main" / f"{s}.txt").is_file()]
        raise DataError(f"--corloc-split={split}: {path} is missing; present: {', '.join(present) or 'none'}")
    return path


def detection_ids(root: str | Path, year: str, split: str, flag: str = "--corloc-year") -> list[str]:
    """Image ids of a VOC detection split (ImageSets/Main/<split>.txt)."""
    return _read_ids(check_detection_split(root, year, split, flag))


def annotation_path(root: str | Path, year: str, image_id: str) -> Path:
    return year_dir(root, year) / "Annotations" / f"{image_id}.xml"


def check_trainaug(root: str | Path) -> Path:
    """The trainaug split file, or DataError saying what is missing and where users get it."""
    folder = year_dir(root, "2012")
    path = folder / "ImageSets" / "Segmentation" / "trainaug.txt"
    if not path.is_file():
        raise DataError(f"--memory-split=trainaug: {path} is missing; {TRAINAUG_HELP}; or use --memory-split=train")
    if not (folder / "SegmentationClassAug").is_dir():
        raise DataError(f"--memory-split=trainaug: {folder / 'SegmentationClassAug'} is missing; {TRAINAUG_HELP}; "
                        "or use --memory-split=train")
    return path


def trainaug_ids(root: str | Path) -> list[str]:
    return _read_ids(check_trainaug(root))


def aug_mask_path(root: str | Path, image_id: str) -> Path:
    return year_dir(root, "2012") / "SegmentationClassAug" / f"{image_id}.png"
