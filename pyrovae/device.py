"""Picking the torch device: nothing in pyrovae names a device itself."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> str:
    """``name`` if it spells a device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), else a ``ValueError``;
    whether that device is there is :func:`resolve_device`'s to say."""
    if not isinstance(name, str) or not (name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)} (or cuda:N)")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)} (or cuda:N)")
