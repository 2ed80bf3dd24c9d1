"""Transforms of pixel values: binarisation."""

from __future__ import annotations

import torch

BINARIZE = ("dynamic", "threshold", "none")
_TEST_BINARIZE_SEED = 1234


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Map pixel intensities in [0, 1] to {0, 1}.

    ``dynamic``: x_bin ~ Bernoulli(x), a fresh draw per call (per epoch for
    training data); ``threshold``: x > 0.5; ``none``: x unchanged.
    """
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    if mode == "none":
        return x
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {', '.join(BINARIZE)}")


def binarize_test(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Binarise a test split once, with a fixed seed, so that test figures are
    comparable across runs and across models."""
    g = torch.Generator(device=x.device).manual_seed(_TEST_BINARIZE_SEED)
    return binarize(x, mode, generator=g)
