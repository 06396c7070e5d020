"""DINO's projection head (Caron et al., 2021; facebookresearch/dino ``vision_transformer.DINOHead``).

An MLP of ``nlayers`` Linear layers (in_dim → hidden_dim → … → bottleneck_dim, GELU between them, optional
BatchNorm1d after each hidden Linear), the L2-normalised bottleneck, then a weight-normalised Linear layer
without bias to ``out_dim`` logits. As in the official code: the MLP's Linear weights start from a
truncated normal (std 0.02, cut at ±2) and their biases at 0; the last layer keeps PyTorch's default
initialisation of its direction, its norm (weight-norm magnitude ``g``) starts at 1, and with
``norm_last_layer`` the norm stays fixed at 1 (``weight_g`` gets no gradient and is left out of the optimiser).

The last layer is :class:`WeightNormLinear`, the computation of the official (deprecated)
``torch.nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))`` with the same parameter names
(``last_layer.weight_g``, ``last_layer.weight_v``), written out as a plain module: unlike PyTorch's
parametrised weight norm it can be pickled (``ddp_spawn`` sends the module to its processes that way), and
unlike the deprecated hook it warns about nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is ``weight_g · weight_v / ‖weight_v‖``, the norm taken per
    output row (weight norm over dim 0, as ``torch.nn.utils.weight_norm``'s default). Starts from
    ``nn.Linear``'s default initialisation of the direction, with ``weight_g`` = its row norms, as there."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        direction = nn.Linear(in_features, out_features, bias=False).weight.detach()
        self.weight_g = nn.Parameter(torch.norm_except_dim(direction, 2, 0))
        self.weight_v = nn.Parameter(direction.clone())
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight(self) -> Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            width = in_dim
            for _ in range(nlayers - 1):
                layers.append(nn.Linear(width, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                width = hidden_dim
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)  # before the last layer exists: it keeps PyTorch's default init
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1.0)
        self.last_layer.weight_g.requires_grad = not norm_last_layer
        self.norm_last_layer = norm_last_layer
        self.in_dim, self.out_dim = in_dim, out_dim

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
