"""Picking the torch device: nothing in pyrovae names a device itself."""

from __future__ import annotations

import torch

from pyrovae.registry import lookup

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(name)
    lookup("device", name, DEVICES, "cuda:N")
    return torch.device("cpu")  # the one name left
