"""Picking the torch device: nothing in pyrovae names a device itself."""

from __future__ import annotations

import torch

from pyrovae.registry import lookup

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> str:
    """``name`` if it spells a device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), else a ``ValueError``;
    whether that device is there is :func:`resolve_device`'s to say."""
    if isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit():
        return name
    return lookup("device", name, DEVICES, "cuda:N")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(name)
    check_device_name(name)
    return torch.device("cpu")  # the one name left
