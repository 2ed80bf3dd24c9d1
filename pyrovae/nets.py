"""Plain ``nn.Module`` networks: no Pyro inside, so they can be reused anywhere."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """``in_dim -> hidden[0] -> ... -> out_dim`` with an activation between layers."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "softplus"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        dims = [in_dim, *hidden, out_dim]
        for name, d in zip(("in_dim", *["hidden"] * len(hidden), "out_dim"), dims):
            if int(d) < 1:
                raise ValueError(f"{name} must be >= 1, got {d}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


def xavier_init_(module: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases for every ``nn.Linear`` (in place)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module
