"""``--segmentation.train_split trainaug``: the SBD-augmented training split, its masks read from
SegmentationClassAug (grey PNGs of class ids), checked against the palette masks the generator writes for the
same images; a VOC root without it fails in one line before the run directory exists."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import main
from config.hparams import DataConfig, SegmentationConfig
from datamodules.segmentation import SegmentationDataModule
from datamodules.voc import voc_dir
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trainaug_reads_the_aug_masks_of_every_listed_image(data_cache, voc_root):
    cfg = DataConfig(dataset="synthetic", root=str(data_cache), img_size=32, batch_size=4, num_workers=0,
                     **TINY_DATA)
    dm = SegmentationDataModule(cfg, SegmentationConfig(train_split="trainaug"))
    dm.setup()
    listed = (voc_dir(voc_root) / "ImageSets" / "Segmentation" / "trainaug.txt").read_text().split()
    assert [p.stem for p in dm.train_set.image_paths] == listed
    assert all(m.parent.name == "SegmentationClassAug" for m in dm.train_set.masks)
    # the generator's grey trainaug masks hold the same class ids as its palette masks
    expected = np.zeros(21, dtype=np.int64)
    for mask_path in dm.train_set.masks:
        palette = np.array(Image.open(voc_dir(voc_root) / "SegmentationClass" / mask_path.name))
        assert Image.open(mask_path).mode == "L" and np.array_equal(np.array(Image.open(mask_path)), palette)
        expected += np.bincount(palette.ravel(), minlength=256)[:21]
    assert dm.class_pixel_counts().tolist() == expected.tolist()  # class weights count the trainaug masks
    image, mask = dm.train_set[(0, 0)]
    assert image.shape == (3, 32, 32) and mask.dtype == torch.long


def test_missing_trainaug_is_one_line_before_any_run_directory(voc_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    (voc_dir(root) / "ImageSets" / "Segmentation" / "trainaug.txt").unlink()
    argv = ["--task=segmentation", "--data.dataset=voc", f"--data.root={root}", "--data.img_size=32",
            "--data.batch_size=4", "--data.num_workers=0", "--backbone.name=vit", "--backbone.depth=2",
            "--backbone.embed_dim=32", "--backbone.num_heads=2", "--backbone.patch_size=8",
            "--segmentation.hidden_dim=16", "--segmentation.train_split=trainaug", "--trainer.max_epochs=1",
            f"--log.output_dir={tmp_path / 'runs'}", "--log.wandb_mode=disabled", "--trainer.progress_bar=false"]
    assert main.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --segmentation.train_split=trainaug: ") and "trainaug.txt is missing" in err[-1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
