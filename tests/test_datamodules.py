"""Data: the VOC layout reader, the two-view transform, seeded sampling and the Barlow Twins DataModule."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.datasets import VOCSegmentation

from config.hparams import AugmentConfig, DataConfig
from datamodules import DATASETS
from datamodules.barlow_twins import BarlowTwinsDataModule, evenly_spaced
from datamodules.images import DataError, load_rgb
from datamodules.sampling import SeededSampler, mix_seed
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, BarlowTwinsTransform, blur_kernel_size
from datamodules.voc import VOCSource, all_image_ids, read_split, voc_dir


def data_cfg(root, **kw) -> DataConfig:
    values = {"dataset": "voc", "root": str(root), "img_size": 32, "batch_size": 4, "num_workers": 0, **kw}
    return DataConfig(**values)


def test_generated_set_is_read_by_torchvision_and_by_us(voc_root):
    for split in ("train", "val"):
        tv = VOCSegmentation(str(voc_root), year="2012", image_set=split)
        assert [p.split("/")[-1][:-4] for p in tv.images] == read_split(voc_root, split)
        image, mask = tv[0]
        assert image.mode == "RGB" and mask.mode == "P"
        values = set(torch.unique(torch.as_tensor(list(mask.getdata()))).tolist())
        assert values <= set(range(21)) | {255}
        assert torch.equal(load_rgb(voc_dir(voc_root) / "JPEGImages" / f"{read_split(voc_root, split)[0]}.jpg"),
                           torch.as_tensor(list(image.getdata()), dtype=torch.uint8).view(image.height, image.width, 3).permute(2, 0, 1))
    assert len(all_image_ids(voc_root)) == 48


def test_views_have_the_right_shape_and_normalisation():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    transform = BarlowTwinsTransform(AugmentConfig(), img_size=32)
    torch.manual_seed(0)
    v1, v2 = transform(image)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)
    # a constant grey image without photometric randomness maps to (x - mean) / std
    flat = AugmentConfig(jitter_prob=0, grayscale_prob=0, blur_prob_1=0, blur_prob_2=0, solarize_prob_1=0, solarize_prob_2=0)
    grey = torch.full((3, 40, 40), 100, dtype=torch.uint8)
    out, _ = BarlowTwinsTransform(flat, 16)(grey)
    expected = torch.tensor([(100 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)


def test_solarisation_and_blur_follow_the_asymmetric_recipe():
    # view 1 never solarises (p=0.0), view 2 always does when p is forced to 1
    cfg = AugmentConfig(jitter_prob=0, grayscale_prob=0, blur_prob_1=0, blur_prob_2=0, solarize_prob_1=0.0,
                        solarize_prob_2=1.0, hflip_prob=0, crop_scale_min=1.0)
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    v1, v2 = BarlowTwinsTransform(cfg, 16)(image)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(v1 * std + mean, torch.full_like(v1, 200 / 255), atol=1e-5)
    assert torch.allclose(v2 * std + mean, torch.full_like(v2, 55 / 255), atol=1e-5)  # 255 - 200
    assert blur_kernel_size(AugmentConfig()) == 13 and blur_kernel_size(AugmentConfig(blur_kernel_size=23)) == 23


def test_seeded_sampler_is_a_permutation_that_changes_with_epoch_only():
    sampler = SeededSampler(20, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(20))
    assert list(sampler) == first  # same epoch → same order and item seeds
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first]
    assert len({s for _, s in first + second}) == 40  # every (epoch, position) gets its own seed
    fixed = SeededSampler(5, seed=3, shuffle=False, vary_with_epoch=False)
    fixed.set_epoch(7)
    assert [i for i, _ in fixed] == list(range(5)) and list(fixed) == list(SeededSampler(5, 3, False, False))
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**70, -5) < 2**63


def batches(loader) -> list:
    return [tuple(t.clone() for t in b) for b in loader]


@pytest.mark.parametrize("choice, count", [("train", 32), ("train+val", 48), ("all", 48)])
def test_pretrain_image_choice(voc_root, choice, count):
    dm = BarlowTwinsDataModule(data_cfg(voc_root, pretrain_images=choice), AugmentConfig(), seed=0)
    dm.setup()
    assert len(dm.train_set) == count
    assert len(dm.train_dataloader()) == count // 4  # drop_last


def test_datamodule_batches_are_deterministic_and_worker_independent(voc_root):
    def epoch_batches(workers: int, seed: int = 0, epoch: int = 0):
        dm = BarlowTwinsDataModule(data_cfg(voc_root, num_workers=workers), AugmentConfig(), seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return batches(loader)

    a = epoch_batches(0)
    x1, x2 = a[0]
    assert x1.shape == x2.shape == (4, 3, 32, 32) and not torch.equal(x1, x2)
    torch.manual_seed(1234)  # global RNG state must not matter
    b = epoch_batches(0)
    assert all(torch.equal(p, q) for u, v in zip(a, b) for p, q in zip(u, v))
    c = epoch_batches(2)  # two worker processes → the very same batches
    assert all(torch.equal(p, q) for u, v in zip(a, c) for p, q in zip(u, v))
    assert not torch.equal(epoch_batches(0, seed=1)[0][0], x1)
    assert not torch.equal(epoch_batches(0, epoch=1)[0][0], x1)


def test_validation_views_repeat_every_epoch(voc_root):
    dm = BarlowTwinsDataModule(data_cfg(voc_root, val_max_images=8), AugmentConfig(), seed=0)
    dm.setup()
    assert len(dm.val_set) == 8
    loader = dm.val_dataloader()
    first = batches(loader)
    loader.sampler.set_epoch(5)
    assert all(torch.equal(p, q) for u, v in zip(first, batches(loader)) for p, q in zip(u, v))


def test_evenly_spaced_subset():
    assert evenly_spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced([1, 2], 0) == [1, 2] and evenly_spaced([1, 2], 5) == [1, 2]


def test_batch_larger_than_dataset_is_a_clear_error(voc_root):
    dm = BarlowTwinsDataModule(DataConfig(dataset="voc", root=str(voc_root), batch_size=64, num_workers=0),
                               AugmentConfig(), seed=0)
    with pytest.raises(DataError, match="--data.batch_size=64 is larger than the 32 training images"):
        dm.setup()


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_rgb(bad)
    with pytest.raises(DataError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")
    good = tmp_path / "good.png"
    Image.new("RGB", (5, 3), (10, 20, 30)).save(good)
    assert load_rgb(good).shape == (3, 3, 5)


def test_voc_source_checks_the_layout(tmp_path, voc_root):
    assert "does not exist" in VOCSource.check(data_cfg(tmp_path / "nope"))
    assert "has no VOCdevkit/VOC2012" in VOCSource.check(data_cfg(tmp_path))
    assert VOCSource.check(data_cfg(voc_root)) is None
    assert VOCSource.check(DataConfig(root=str(tmp_path / "nope"), download=True)) is None
    assert sorted(DATASETS.names()) == ["folder", "imagenet", "synthetic", "voc"]


def test_synthetic_source_generates_once_into_the_cache(data_cache, voc_root):
    cfg = DataConfig(dataset="synthetic", root=str(data_cache), synthetic_train=32, synthetic_val=16, synthetic_size=32)
    assert DATASETS.get("synthetic").prepare(cfg) == voc_root
    assert "synthetic_val must be >= 1" in DATASETS.get("synthetic").check(DataConfig(synthetic_val=0))
