"""Sampling where every random draw depends only on (seed, epoch, position), never on global RNG state.

The sampler yields ``(index, item_seed)`` pairs and datasets seed their augmentations with ``item_seed``.
So the views an image gets do not depend on the number of DataLoader workers, on which worker loads it,
or on whether the run was resumed from a checkpoint: same seed and config → same batches.
Lightning calls ``set_epoch`` at the start of every epoch (also after a resume).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from datamodules.errors import DataError

_CHUNK = 4096  # items turned into Python ints at a time while iterating a shuffled order
_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads nearby (seed, epoch) pairs apart


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (deterministic across processes, unlike ``hash``)."""
    value = 0
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside distributed training."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` for every item, in a (seed, epoch)-determined order.

    ``shuffle=False`` with ``vary_with_epoch=False`` gives the same order and item seeds every epoch
    (validation: losses and pictures comparable across epochs).

    Distributed training: each of the W processes takes every W-th position of the same order (rank r:
    positions r, r + W, ...). Step t's local batches of size B then together hold exactly positions
    [t·W·B, (t+1)·W·B) of the order, with the same item seeds — the batch a single process with batch
    W·B would see, so a run on W devices trains on the same global batches as one device. ``even=True``
    (training, and evaluation with collective operations) gives every process the same number of items
    by dropping the last ``len % W``; ``even=False`` keeps every item (uneven shards).
    The rank and world size are read when iterating, after Lightning has set up the process group.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, vary_with_epoch: bool = True,
                 even: bool = True, shard: bool = True):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.vary_with_epoch = vary_with_epoch
        self.even = even
        self.shard = shard
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items of this shard already trained on)
        self._resume_at_first_iteration = None  # a callable giving such a pair when first iterated

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_and_size(self) -> tuple[int, int]:
        return distributed_rank_and_size() if self.shard else (0, 1)

    def _positions(self) -> range:
        rank, size = self._rank_and_size()
        end = self.num_items - self.num_items % size if self.even else self.num_items
        return range(rank, end, size)

    def __len__(self) -> int:
        return len(self._positions())

    def resume_within_epoch(self, epoch: int, skip: int) -> None:
        """The next pass over ``epoch`` starts at item ``skip`` of this process's shard, continuing a run
        resumed from a checkpoint taken mid-epoch: the items it trained on before are not drawn again, and
        the rest come in the same order with the same item seeds. ``len()`` stays the full epoch's (the
        trainer's count of batches per epoch must not change). Used once."""
        self._resume = (epoch, skip) if skip > 0 else None

    def resume_when_iterated(self, where) -> None:
        """Like :meth:`resume_within_epoch`, with ``where()`` (→ ``(epoch, skip)`` or None) called at the first
        iteration, when the information it needs exists."""
        self._resume_at_first_iteration = where

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._resume_at_first_iteration is not None:
            where, self._resume_at_first_iteration = self._resume_at_first_iteration, None
            found = where()
            if found is not None:
                self.resume_within_epoch(*found)
        epoch = self.epoch if self.vary_with_epoch else 0
        positions = self._positions()
        if self._resume is not None and self._resume[0] == self.epoch:
            positions = positions[self._resume[1]:]
            self._resume = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
            # kept as one int64 tensor (8 bytes an item) and turned into Python ints a chunk at a time: a list
            # of the whole order would hold a Python object per image (~40 MB per million images)
            order = torch.randperm(self.num_items, generator=generator)[positions.start:positions.stop:positions.step]
        else:
            order = None
        for start in range(0, len(positions), _CHUNK):
            chunk = positions[start:start + _CHUNK]
            indices = order[start:start + _CHUNK].tolist() if order is not None else chunk
            for position, index in zip(chunk, indices):
                yield index, mix_seed(self.seed, epoch, 1, position)


def resume_mid_epoch(loader, trainer) -> None:
    """If ``trainer`` is fitting from a checkpoint taken in the middle of an epoch, make the training loader's
    :class:`SeededSampler` skip the batches that epoch already trained on. Lightning restores the step
    counter but, for a plain DataLoader, would start the epoch's data from its first batch again.

    Decided at the loader's first iteration, not now: Lightning asks for the training loader before it
    restores the checkpoint (to count the steps for the LR schedule). Every epoch has the same number of
    optimizer steps (``drop_last``, no gradient accumulation), so the restored step counter alone says where
    the run stopped: epoch ``global_step // steps_per_epoch``, batch ``global_step % steps_per_epoch``."""
    sampler = getattr(loader, "sampler", None)
    if trainer is None or not isinstance(sampler, SeededSampler) or not getattr(trainer, "ckpt_path", None):
        return

    def where() -> tuple[int, int] | None:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return None
        epoch, done = divmod(trainer.global_step, batches)
        return epoch, done * loader.batch_size

    sampler.resume_when_iterated(where)


class _StartOnFirstBatch:
    """The iterator of a :class:`SeededLoader`: creates the DataLoader's real iterator when the first batch is
    asked for (see there)."""

    def __init__(self, loader: "SeededLoader"):
        self._loader = loader
        self._iterator = None

    def __iter__(self) -> "_StartOnFirstBatch":
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = DataLoader.__iter__(self._loader)
        try:
            return next(self._iterator)
        except RuntimeError as err:
            if not str(err).startswith("DataLoader timed out"):
                raise
            raise DataError(
                f"no batch came from the {self._loader.num_workers} DataLoader worker processes within "
                f"--data.worker_timeout={self._loader.timeout:g} s: a worker is stuck (a hung file system or a "
                f"blocked read); raise --data.worker_timeout if loading is this slow, or try --data.num_workers 0"
            ) from None

    def __len__(self) -> int:
        return len(self._loader)


class SeededLoader(DataLoader):
    """A DataLoader whose worker processes receive their first indices when the first batch is asked for,
    not when it is iterated.

    With ``num_workers > 0`` a plain DataLoader draws ``prefetch_factor × num_workers`` batches of indices from
    its sampler the moment ``iter()`` is called. Lightning calls ``iter()`` on the training loader while it
    sets up the optimizer (to count the schedule's steps), before it restores a checkpoint and before it sets
    the sampler's epoch, and does not call it again for the epoch a resumed run continues: the workers would
    load epoch 0 from its first batch, whatever the checkpoint holds (with 0 workers the sampler is read
    lazily and the problem does not show). Deferring the real ``iter()`` to the first ``next()`` makes the
    sampler see the restored step and the epoch, so a resumed run loads exactly the batches the
    uninterrupted run would have, with or without workers."""

    def __iter__(self):
        return _StartOnFirstBatch(self)


@contextmanager
def seeded(item_seed: int):
    """Run the body with the global torch RNG seeded by ``item_seed``, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_seed)
        yield
