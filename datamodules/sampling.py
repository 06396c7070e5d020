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
from torch.utils.data import Sampler

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads nearby (seed, epoch) pairs apart


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (deterministic across processes, unlike ``hash``)."""
    value = 0
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` for every item, in a (seed, epoch)-determined order.

    ``shuffle=False`` with ``vary_with_epoch=False`` gives the same order and item seeds every epoch
    (validation: losses and pictures comparable across epochs).
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, vary_with_epoch: bool = True):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.vary_with_epoch = vary_with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch if self.vary_with_epoch else 0
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = range(self.num_items)
        for position, index in enumerate(order):
            yield index, mix_seed(self.seed, epoch, 1, position)


@contextmanager
def seeded(item_seed: int):
    """Run the body with the global torch RNG seeded by ``item_seed``, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_seed)
        yield
