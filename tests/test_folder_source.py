"""Image-folder sources (``--data.dataset folder`` / ``imagenet``): what the index holds (checked against lists
written out by hand), its cache and when the cache is thrown away, bad files, the three augmentation back-ends,
pretraining here and probing on a VOC-layout set given with ``--data.eval_root``, and the config errors."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from config.hparams import AugmentConfig, DataConfig
from datamodules.barlow_twins import BarlowTwinsDataModule
from datamodules.errors import DataError
from datamodules.folder import FolderSource, SubstitutingTwoViewDataset, BadImageCounter
from datamodules.image_index import (INDEX_FOLDER, ImageIndex, cache_path, load_or_build_index,
                                     read_file_list, walk_images)
from datamodules.sampling import SeededSampler, seeded
from datamodules.transforms import BarlowTwinsTransform
from tests.conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def save_picture(path: Path, seed: int, size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    Image.fromarray(pixels).save(path, fmt)
    return path


def age(tree: Path, seconds: float = 60) -> None:
    """Set every directory's mtime into the past (a tree written just now cannot be cached: a change in the
    same clock tick as the listing could go unseen, datamodules/image_index.py)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(tree):
        os.utime(folder, (past, past))


@pytest.fixture
def tree(tmp_path) -> Path:
    """Images of the three formats (mixed-case endings) at several depths, and things that are not images."""
    root = tmp_path / "images"
    for i, rel in enumerate(["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.JPEG", "sub/deeper/e.jpeg",
                             "z/f.png"]):
        save_picture(root / rel, i)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "labels.json").write_text("{}")
    (root / ".hidden.jpg").write_bytes(b"x")  # hidden entries are skipped
    (root / "sub" / "loop").symlink_to(root / "sub", target_is_directory=True)  # walked once
    age(root)
    return root


EXPECTED = ["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.JPEG", "sub/deeper/e.jpeg", "z/f.png"]


# ----------------------------------------------------------------------------------------------- the index
def test_walk_finds_every_image_once_and_ignores_other_files(tree):
    listing = walk_images(tree)
    assert listing.names == EXPECTED
    assert listing.ignored == 2  # notes.txt, labels.json
    index = ImageIndex.from_names(tree, listing.names)
    assert len(index) == 6
    assert [index[i] for i in range(6)] == [tree / n for n in EXPECTED]
    assert index[1:3] == [tree / "b.PNG", tree / "sub/c.webp"]
    assert index[-1] == tree / "z/f.png"
    with pytest.raises(IndexError):
        index[6]


def test_subfolders_restrict_the_walk(tree):
    assert walk_images(tree, ["sub/deeper", "z"]).names == ["sub/deeper/d.JPEG", "sub/deeper/e.jpeg", "z/f.png"]


def test_index_memory_is_the_paths_bytes_plus_one_offset_per_image():
    names = [f"n{i % 1000:04d}/img_{i:07d}.JPEG" for i in range(100_000)]
    index = ImageIndex.from_names(Path("/data"), names, labels=[i % 1000 for i in range(100_000)])
    path_bytes = sum(len(n) for n in names)
    assert index.nbytes() == path_bytes + 8 * (len(names) + 1) + 4 * len(names)
    # no Python object per image: numpy arrays only
    assert all(isinstance(v, np.ndarray) for k, v in vars(index).items() if k.startswith("_"))
    assert index.name(54_321) == names[54_321] and int(index.labels[54_321]) == 321


def test_non_utf8_file_names_round_trip(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, not valid UTF-8
    save_picture(tmp_path / "x.jpg", 0)
    os.rename(tmp_path / "x.jpg", tmp_path / name)
    index = ImageIndex.from_names(tmp_path, walk_images(tmp_path).names)
    assert os.fsencode(str(index[0])).endswith(b"caf\xe9.jpg") and index[0].is_file()


def test_file_list_keeps_its_order_and_skips_comments_and_other_files(tree, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen images\nz/f.png\n\nsub/c.webp\nnotes.txt\n{tree.resolve() / 'a.jpg'}\n")
    names, ignored = read_file_list(listing, tree)
    assert names == ["z/f.png", "sub/c.webp", "a.jpg"] and ignored == 1
    cfg = DataConfig(dataset="folder", root=str(tree), file_list=str(listing))
    assert list(FolderSource.index(cfg)) == [tree / "z/f.png", tree / "sub/c.webp", tree / "a.jpg"]


def test_imagenet_tree_keeps_class_ids_in_folder_name_order(tmp_path):
    from datamodules.folder import ImageNetSource

    root = tmp_path / "imagenet"
    for rel in ["train/n02/x1.JPEG", "train/n01/y1.JPEG", "train/n01/y2.JPEG", "train/n03/sub/z.png",
                "train/stray.JPEG", "val/n01/v.JPEG"]:
        save_picture(root / rel, len(rel))
    age(root)
    index = ImageNetSource.index(DataConfig(dataset="imagenet", root=str(root), index_dir=str(tmp_path / "idx")))
    assert [index.name(i) for i in range(len(index))] == ["n01/y1.JPEG", "n01/y2.JPEG", "n02/x1.JPEG", "n03/sub/z.png"]
    assert index.labels.tolist() == [0, 0, 1, 2]
    assert index.classes == ("n01", "n02", "n03")
    # the labels survive the cache
    again, cached = load_or_build_index(root / "train", labelled=True, index_dir=str(tmp_path / "idx"))
    assert cached and again.labels.tolist() == [0, 0, 1, 2] and again.classes == ("n01", "n02", "n03")


# ----------------------------------------------------------------------------------------------- the cache
def test_cache_is_used_then_invalidated_when_files_change(tree):
    first, cached = load_or_build_index(tree)
    assert not cached and list(first) == [tree / n for n in EXPECTED]
    cache = list((tree / INDEX_FOLDER).iterdir())
    assert len(cache) == 1 and cache[0].suffix == ".npz"  # one file, in the documented hidden folder
    second, cached = load_or_build_index(tree)
    assert cached and list(second) == list(first)
    assert INDEX_FOLDER not in {p.parts[-2] for p in second}  # the cache never lists itself

    save_picture(tree / "sub" / "deeper" / "new.png", 99)  # a file added two levels down
    third, cached = load_or_build_index(tree)
    assert not cached and tree / "sub/deeper/new.png" in list(third) and len(third) == 7

    assert load_or_build_index(tree)[1]  # the new listing is cached in turn
    (tree / "z" / "f.png").unlink()  # a file removed
    fourth, cached = load_or_build_index(tree)
    assert not cached and tree / "z/f.png" not in list(fourth) and len(fourth) == 6

    assert load_or_build_index(tree)[1]  # the new listing is cached in turn
    (tree / "sub" / "deeper").rename(tree / "sub" / "moved")  # a folder renamed
    fifth, cached = load_or_build_index(tree)
    assert not cached and tree / "sub/moved/d.JPEG" in list(fifth)


def test_a_change_in_the_same_clock_tick_as_the_listing_is_found(tree):
    now = time.time_ns()
    os.utime(tree / "sub", ns=(now, now))  # modified just before the listing: its time cannot be trusted
    load_or_build_index(tree)
    recorded = os.stat(tree / "sub").st_mtime_ns
    save_picture(tree / "sub" / "late.png", 5)
    os.utime(tree / "sub", ns=(recorded, recorded))  # a coarse clock: the folder's time did not move
    index, cached = load_or_build_index(tree)
    assert not cached and tree / "sub/late.png" in list(index)
    assert load_or_build_index(tree)[1]  # unchanged since: the recent folders are compared, and match


def test_cache_keys_differ_by_root_and_options(tree, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    keys = {cache_path(tree, {"subfolders": []}, str(tmp_path)), cache_path(tree, {"subfolders": ["z"]}, str(tmp_path)),
            cache_path(other, {"subfolders": []}, str(tmp_path))}
    assert len(keys) == 3


def test_index_dir_keeps_the_data_folder_untouched(tree, tmp_path):
    before = sorted(p.name for p in tree.iterdir())
    _, cached = load_or_build_index(tree, index_dir=str(tmp_path / "elsewhere"))
    assert not cached and sorted(p.name for p in tree.iterdir()) == before
    assert load_or_build_index(tree, index_dir=str(tmp_path / "elsewhere"))[1]


def test_damaged_cache_file_is_rebuilt(tree):
    load_or_build_index(tree)
    next((tree / INDEX_FOLDER).iterdir()).write_bytes(b"not an npz")
    index, cached = load_or_build_index(tree)
    assert not cached and len(index) == 6
    assert load_or_build_index(tree)[1]


# ----------------------------------------------------------------------------------------------- bad files
def test_undecodable_file_is_named_in_one_line_by_default(tree):
    (tree / "sub" / "c.webp").write_bytes(b"garbage")
    age(tree)
    transform = BarlowTwinsTransform(AugmentConfig(), 32)
    from datamodules.barlow_twins import TwoViewDataset

    dataset = TwoViewDataset(FolderSource.index(DataConfig(dataset="folder", root=str(tree))), transform)
    with pytest.raises(DataError, match=r"^cannot decode image .*sub/c\.webp: "):
        dataset[(2, 0)]


def test_skipped_bad_image_is_replaced_by_the_next_good_one_with_the_items_seed(tree):
    (tree / "sub" / "c.webp").write_bytes(b"garbage")  # index 2
    (tree / "sub" / "deeper" / "d.JPEG").write_bytes(b"")  # index 3: two in a row
    age(tree)
    index = FolderSource.index(DataConfig(dataset="folder", root=str(tree)))
    transform = BarlowTwinsTransform(AugmentConfig(), 32)
    counter = BadImageCounter()
    dataset = SubstitutingTwoViewDataset(index, transform, counter)
    from datamodules.images import load_rgb

    for bad, substitute in ((2, 4), (3, 4)):
        with seeded(1234):
            expected = transform(load_rgb(index[substitute]))
        got = dataset[(bad, 1234)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert counter.total() == 2
    assert len(dataset) == 6  # the epoch keeps its length


def test_skipped_images_are_counted_across_workers_and_batches_do_not_depend_on_them(tree):
    from torch.utils.data import DataLoader

    (tree / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    age(tree)
    index = FolderSource.index(DataConfig(dataset="folder", root=str(tree)))
    transform = BarlowTwinsTransform(AugmentConfig(), 32)

    def epoch(workers: int):
        counter = BadImageCounter()
        dataset = SubstitutingTwoViewDataset(index, transform, counter)
        loader = DataLoader(dataset, batch_size=3, sampler=SeededSampler(len(dataset), 7), num_workers=workers,
                            drop_last=True)
        return [b[0] for b in loader], counter.total()

    alone, count_alone = epoch(0)
    shared, count_shared = epoch(2)
    assert count_alone == count_shared == 1
    assert all(torch.equal(a, b) for a, b in zip(alone, shared)) and len(alone) == 2


# ----------------------------------------------------------------------------------------------- the datamodule
@pytest.mark.parametrize("device", ["cpu", "gpu_photometric", "gpu_full"])
def test_every_augmentation_backend_reads_jpeg_png_and_webp(tree, voc_root, device):
    cfg = DataConfig(dataset="folder", root=str(tree), img_size=32, batch_size=6, num_workers=0,
                     eval_root=str(voc_root))
    dm = BarlowTwinsDataModule(cfg, AugmentConfig(device=device), seed=3)
    dm.setup()
    assert dm.root == voc_root and len(dm.train_set) == 6
    assert all(p.parent.name == "JPEGImages" for p in dm.val_set.image_paths)  # validation: the eval set's val split
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    x1, x2 = batch[:2]
    assert x1.shape == x2.shape == (6, 3, 32, 32) and x1.dtype == torch.float32 and torch.isfinite(x1).all()


def test_backends_draw_the_same_crops_on_folder_images(tree, voc_root):
    """gpu_full decodes PNG/WebP one by one: its views equal the CPU pipeline's without photometric noise."""
    no_colour = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob_1=0.0, blur_prob_2=0.0, solarize_prob_1=0.0,
                     solarize_prob_2=0.0)
    views = {}
    for device in ("cpu", "gpu_full"):
        cfg = DataConfig(dataset="folder", root=str(tree), img_size=32, batch_size=6, num_workers=0,
                         eval_root=str(voc_root))
        dm = BarlowTwinsDataModule(cfg, AugmentConfig(device=device, **no_colour), seed=3)
        dm.setup()
        views[device] = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)[0]
    # one uint8 level (rounding ties of the resampling) on a few pixels at most, after normalisation
    assert (views["cpu"] - views["gpu_full"]).abs().max() < 2 / 255 / 0.224


def test_without_eval_root_validation_uses_training_images(tree):
    cfg = DataConfig(dataset="folder", root=str(tree), img_size=32, batch_size=2, num_workers=0, val_max_images=3)
    dm = BarlowTwinsDataModule(cfg, AugmentConfig(), seed=0)
    dm.setup()
    assert dm.root is None
    assert dm.val_set.image_paths == [tree / EXPECTED[0], tree / EXPECTED[2], tree / EXPECTED[4]]  # evenly spaced


# ----------------------------------------------------------------------------------------------- end to end
def folder_args(tree: Path, tmp_path: Path, run: str, **overrides) -> list[str]:
    values = {"data__dataset": "folder", "data__root": str(tree), "data__batch_size": 3,
              "data__synthetic_train": 32}
    values.update(overrides)
    return tiny_args(tmp_path / "unused", tmp_path / "runs", run, **values)


def test_pretrain_on_a_folder_and_measure_on_a_voc_layout_set(tree, voc_root, tmp_path):
    argv = folder_args(tree, tmp_path, "folder", data__eval_root=voc_root, callbacks__online_probe="true",
                       callbacks__online_probe_every_n_epochs=1, trainer__max_epochs=1)
    assert main.main(argv) == 0
    header = (tmp_path / "runs" / "folder" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/attn_jaccard", "val/probe_mIoU", "train/loss_step", "val/loss"} <= set(header)


def test_damaged_image_stops_the_run_in_one_line_or_is_skipped_with_a_count(tree, voc_root, tmp_path, capsys, caplog):
    (tree / "b.PNG").write_bytes(b"\x89PNG broken")
    age(tree)
    argv = folder_args(tree, tmp_path, "bad", data__eval_root=voc_root, callbacks__emergence="false",
                       trainer__max_epochs=1)
    assert main.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot decode image ") and "b.PNG" in err[-1]
    assert not (tmp_path / "runs" / "bad").exists()  # nothing to keep

    with caplog.at_level("WARNING"):
        assert main.main(folder_args(tree, tmp_path, "skip", data__eval_root=voc_root, callbacks__emergence="false",
                                     trainer__max_epochs=1, data__skip_bad_images="true")) == 0
    counts = [r.getMessage() for r in caplog.records if "undecodable image(s) replaced" in r.getMessage()]
    assert counts == ["epoch 0: 1 undecodable image(s) replaced by the next decodable one (--data.skip_bad_images; "
                      "the epoch kept its length and order)"]
    assert any("b.PNG" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("overrides, message", [
    ({}, "--callbacks.emergence measure against VOC masks, which --data.dataset=folder does not have: give a labelled "
         "set with --data.eval_root DIR (a folder holding VOCdevkit/VOC2012), or set --callbacks.emergence=false"),
    ({"callbacks__emergence": "false", "callbacks__online_probe": "true"},
     "--callbacks.online_probe measure against VOC masks"),
    ({"task": "segmentation"}, "--data.dataset=folder has no masks: --task=segmentation needs a labelled set"),
    ({"data__eval_root": "/nonexistent"}, "--data.eval_root: '/nonexistent' has no VOCdevkit/VOC2012/JPEGImages"),
    ({"data__root": "/nonexistent"}, "--data.root: '/nonexistent' is not a folder"),
    ({"data__dataset": "synthetic", "data__eval_root": "x"}, "--data.eval_root applies to the image-folder sources"),
    ({"data__dataset": "imagenet"}, "has no train/ folder; --data.dataset imagenet reads <root>/train/<class>/<image>"),
    ({"data__file_list": "/nonexistent.txt"}, "--data.file_list: file '/nonexistent.txt' does not exist"),
])
def test_config_errors_are_one_line_before_any_compute(tree, tmp_path, capsys, overrides, message):
    assert main.main(folder_args(tree, tmp_path, "err", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "runs").exists()


def test_empty_folder_is_one_line_and_leaves_no_run(tmp_path, voc_root, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert main.main(folder_args(empty, tmp_path, "empty", data__eval_root=voc_root)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no JPG/PNG/WEBP images in ") and not (tmp_path / "runs" / "empty").exists()


def test_dino_multicrop_reads_a_folder_too(tree, voc_root):
    from config.hparams import DinoConfig
    from datamodules.dino import DinoDataModule

    cfg = DataConfig(dataset="folder", root=str(tree), img_size=32, batch_size=3, num_workers=0,
                     eval_root=str(voc_root))
    dm = DinoDataModule(cfg, AugmentConfig(device="gpu_full"), DinoConfig(local_crops_number=2, local_crop_size=16))
    dm.setup()
    crops = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2


def test_coco_style_subfolders_are_plain_folders(tmp_path):
    coco = tmp_path / "coco"
    for rel in ["train2017/000000000009.jpg", "unlabeled2017/000000000008.jpg", "val2017/000000000139.jpg"]:
        save_picture(coco / rel, len(rel))
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    age(coco)
    cfg = DataConfig(dataset="folder", root=str(coco), subfolders="train2017, unlabeled2017")
    assert FolderSource.check(cfg) is None
    assert list(FolderSource.index(cfg)) == [coco / "train2017/000000000009.jpg", coco / "unlabeled2017/000000000008.jpg"]
    assert FolderSource.index(DataConfig(dataset="folder", root=str(coco))).root == coco  # all three image folders
    assert len(FolderSource.index(DataConfig(dataset="folder", root=str(coco)))) == 3
    assert FolderSource.check(DataConfig(dataset="folder", root=str(coco), subfolders="test2017")) == \
        f"--data.subfolders: 'test2017' is not a folder under {coco}"
