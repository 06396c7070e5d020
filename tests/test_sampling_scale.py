"""Sharded sampling with several ranks and several DataLoader workers per rank: the global batches are those of
one process with no workers, item for item (image and views), epoch after epoch.

Two real processes (gloo process group, CPU) each load their shard with 2 worker processes through the
pretraining DataModule on an image folder; the reference is one process with the global batch and 0 workers.
SeededSampler's contract (datamodules/sampling.py): rank r of W takes positions r, r + W, ... of the epoch's
order, so at step t rank r's j-th item is global position t·W·B + r + j·W.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config.hparams import AugmentConfig, DataConfig
from datamodules.barlow_twins import BarlowTwinsDataModule

RANKS, WORKERS, LOCAL_BATCH, EPOCHS, IMAGES = 2, 2, 3, 2, 26  # 26 = 4 global batches of 6 and 2 left over


def make_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    for i in range(IMAGES):
        folder = root / f"part{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.{('jpg', 'png', 'webp')[i % 3]}")


def epochs_of_batches(root: Path, batch_size: int, workers: int) -> list[list[torch.Tensor]]:
    """[epoch][step] → first views of the batch (what the model receives), through the real DataModule."""
    cfg = DataConfig(dataset="folder", root=str(root), img_size=16, batch_size=batch_size, num_workers=workers,
                     index_dir=str(root.parent / "index"))
    dm = BarlowTwinsDataModule(cfg, AugmentConfig(), seed=11)
    dm.setup()
    loader = dm.train_dataloader()
    out = []
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        out.append([dm.on_after_batch_transfer(batch, 0)[0] for batch in loader])
    return out


def _rank_main(rank: int, root: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    try:
        batches = epochs_of_batches(Path(root), LOCAL_BATCH, WORKERS)
        torch.save(batches, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_shards_match(single, shards) -> None:
    for epoch in range(EPOCHS):
        assert all(len(shard[epoch]) == len(single[epoch]) for shard in shards)  # same steps per epoch
        for step, reference in enumerate(single[epoch]):
            for rank in range(RANKS):
                local = shards[rank][epoch][step]
                # rank r's j-th item is the global batch's item r + j·W
                assert torch.equal(local, reference[rank::RANKS]), (epoch, step, rank)
    # and the epochs differ (a new order and new views each epoch)
    assert not torch.equal(single[0][0], single[1][0])


@pytest.mark.usefixtures("one_thread")
def test_each_rank_with_two_workers_sees_its_share_of_the_batches_of_one_process_without_workers(tmp_path, monkeypatch):
    """The sampler runs in the main process of each rank: the rank a process group would report is set
    directly (the processes themselves, with gloo, are the slow test below)."""
    import datamodules.sampling as sampling

    root = tmp_path / "images"
    make_folder(root)
    single = epochs_of_batches(root, RANKS * LOCAL_BATCH, workers=0)
    assert [len(e) for e in single] == [IMAGES // (RANKS * LOCAL_BATCH)] * EPOCHS
    shards = []
    for rank in range(RANKS):
        monkeypatch.setattr(sampling, "distributed_rank_and_size", lambda rank=rank: (rank, RANKS))
        shards.append(epochs_of_batches(root, LOCAL_BATCH, WORKERS))
    check_shards_match(single, shards)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_ranks_with_two_workers_each_see_the_batches_of_one_process_without_workers(tmp_path):
    root = tmp_path / "images"
    make_folder(root)
    single = epochs_of_batches(root, RANKS * LOCAL_BATCH, workers=0)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    mp.spawn(_rank_main, args=(str(root), str(tmp_path / "store"), str(tmp_path)), nprocs=RANKS, join=True)
    check_shards_match(single, [torch.load(tmp_path / f"rank{r}.pt") for r in range(RANKS)])
