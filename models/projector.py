"""The Barlow Twins projector head."""
from __future__ import annotations

from torch import nn


class Projector(nn.Sequential):
    """``num_layers`` Linear layers of width ``dim``; BatchNorm1d + ReLU between them (official layout:
    no biases, since BatchNorm follows every hidden layer and the loss standardises the output)."""

    def __init__(self, in_dim: int, dim: int, num_layers: int = 3):
        if num_layers < 1 or dim < 1:
            raise ValueError(f"projector needs num_layers >= 1 and dim >= 1, got {num_layers} and {dim}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            width = dim
        layers.append(nn.Linear(width, dim, bias=False))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, dim
