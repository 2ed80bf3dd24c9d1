"""Value checks at the bottom of the package: they import only torch, so a
model file can check its inputs without importing the data package."""

from __future__ import annotations

import torch


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf: one bad pixel would turn
    the whole ELBO, and then every weight, into NaN. A full pass over ``x``, so
    the models call it only under ``pyro.enable_validation``."""
    if not torch.isfinite(x).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{name} must hold finite values, got {n_nan} nan and {n_inf} inf entries of {x.numel()}")


def check_positive(value: int, name: str) -> None:
    """Raise ``ValueError`` unless the size ``value`` is at least 1."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
