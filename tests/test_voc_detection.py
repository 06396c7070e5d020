"""The VOC detection layout and trainaug split: what the synthetic generator writes, checked against its masks
and read by torchvision's own VOC reader, and the readers' one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.errors import DataError
from datamodules.synthetic_voc import DIFFICULT_FRACTION, VOC_CLASSES
from datamodules.voc_detection import (annotation_path, aug_mask_path, check_detection_split, detection_ids,
                                       trainaug_ids, year_dir)


def test_every_instance_has_a_tight_one_based_box_and_its_flags(voc_root):
    from analysis.discovery import voc_gt_boxes
    import xml.etree.ElementTree as ET

    voc = year_dir(voc_root, "2012")
    ids = detection_ids(voc_root, "2012", "trainval")
    assert ids == (voc / "ImageSets/Segmentation/trainval.txt").read_text().split()
    seen_truncated = 0
    for image_id in ids:
        instances = np.array(Image.open(voc / "SegmentationObject" / f"{image_id}.png"))
        classes = np.array(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
        root = ET.parse(annotation_path(voc_root, "2012", image_id)).getroot()
        size = instances.shape[0]
        assert (root.findtext("size/width"), root.findtext("size/height")) == (str(size), str(size))
        objects = root.findall("object")
        assert len(objects) == len(set(np.unique(instances)) - {0, 255})  # one box per instance
        boxes = voc_gt_boxes(annotation_path(voc_root, "2012", image_id))
        for k, (obj, box) in enumerate(zip(objects, boxes), start=1):
            rows, cols = np.nonzero(instances == k)
            # VOC's 1-based inclusive box → LOST's [xmin-1, ymin-1, xmax, ymax] encloses the instance's pixels
            assert box[0] <= cols.min() and box[1] <= rows.min()
            assert box[2] >= cols.max() + 1 and box[3] >= rows.max() + 1
            # ... and is tight up to the void band painted over the instance's border
            band = (instances == k) | (instances == 255)
            assert band[box[1]:box[3], box[0]].any() and band[box[1]:box[3], box[2] - 1].any()
            assert band[box[1], box[0]:box[2]].any() and band[box[3] - 1, box[0]:box[2]].any()
            assert obj.findtext("name") == VOC_CLASSES[int(np.bincount(classes[instances == k]).argmax())]
            shown = int((instances == k).sum())
            assert obj.findtext("difficult") == str(int(shown < DIFFICULT_FRACTION * size * size))
            seen_truncated += obj.findtext("truncated") == "1"
    assert seen_truncated > 0  # the flags occur, so remove_hards has something to drop


def test_torchvision_reads_the_detection_layout(voc_root):
    from torchvision.datasets import VOCDetection

    dataset = VOCDetection(str(voc_root), year="2012", image_set="val")
    image, target = dataset[0]
    assert target["annotation"]["filename"] == "val_000001.jpg" and image.size[0] == image.size[1]
    assert all(set(o["bndbox"]) == {"xmin", "ymin", "xmax", "ymax"} for o in target["annotation"]["object"])


def test_trainaug_is_the_train_split_with_grey_masks_equal_to_the_class_masks(voc_root):
    voc = year_dir(voc_root, "2012")
    ids = trainaug_ids(voc_root)
    assert ids == (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    for image_id in ids[:5]:
        with Image.open(aug_mask_path(voc_root, image_id)) as aug, \
                Image.open(voc / "SegmentationClass" / f"{image_id}.png") as cls:
            assert aug.mode == "L" and np.array_equal(np.array(aug), np.array(cls))


def test_readers_name_what_is_missing(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    with pytest.raises(DataError, match=r"--corloc-year=2007: .*VOC2007 does not exist"):
        check_detection_split(tmp_path, "2007", "trainval")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    with pytest.raises(DataError, match=r"CorLoc needs box annotations: .*VOC2007/Annotations is missing"):
        check_detection_split(tmp_path, "2007", "trainval")
    (voc / "Annotations").mkdir()
    (voc / "ImageSets" / "Main" / "val.txt").write_text("000005\n")
    with pytest.raises(DataError, match=r"--corloc-split=trainval: .*trainval.txt is missing; present: val"):
        check_detection_split(tmp_path, "2007", "trainval")
    assert detection_ids(tmp_path, "2007", "val") == ["000005"]
    with pytest.raises(DataError, match=r"--memory-split=trainaug: .*trainaug.txt is missing; trainaug is VOC 2012's "
                                        r"SBD-augmented"):
        trainaug_ids(tmp_path)
    seg = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "trainaug.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"SegmentationClassAug is missing"):
        trainaug_ids(Path(tmp_path))
