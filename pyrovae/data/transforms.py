"""Transforms of pixel values: binarisation."""

from __future__ import annotations

import torch

from pyrovae.registry import lookup

BINARIZE = ("dynamic", "threshold", "none")
_TEST_BINARIZE_SEED = 1234


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Map pixel intensities in [0, 1] to {0, 1}.

    ``dynamic``: x_bin ~ Bernoulli(x), a fresh draw per call (per epoch for
    training data); ``threshold``: x > 0.5; ``none``: x unchanged.
    """
    lookup("binarize mode", mode, BINARIZE)
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    return x


def binarize_test(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Binarise a test split once, with a fixed seed, so that test figures are
    comparable across runs and across models."""
    g = torch.Generator(device=x.device).manual_seed(_TEST_BINARIZE_SEED)
    return binarize(x, mode, generator=g)
