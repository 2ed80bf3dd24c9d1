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


def check_batch(
    x, x_dim: int, device: torch.device, dtype: torch.dtype | None = None, name: str = "x", owner: str = "model"
) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a float tensor of flat examples, shape
    ``(B >= 1, x_dim)``, on ``device``; return it in ``dtype`` (float64 or
    half-precision data are cast: a model computes in one dtype), or as it is
    for ``dtype=None``. The values are the caller's to check (:func:`check_finite`
    under ``pyro.enable_validation``, ranges)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of floats, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != x_dim:
        raise ValueError(f"{name} must have shape (batch >= 1, {x_dim}) (flattened examples), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0): it must have shape (batch >= 1, {x_dim})")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the {owner} is on {device}; move one with .to()")
    return x if dtype is None else x.to(dtype)
