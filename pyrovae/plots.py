"""Figures written by training runs. Plots read numbers; they never touch a model."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from PIL import Image


def plot_curves(
    path: str,
    x: Sequence[float] | Mapping[str, Sequence[float]],
    curves: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str | Mapping[str, str],
    title: str = "",
) -> None:
    """One line per named curve against ``x``, saved as PNG. ``x`` is every
    curve's, or a mapping from each curve to its own (a training curve every
    epoch, a test curve at each evaluation). ``ylabel`` is the unit of every
    curve, or a mapping from each curve to its unit: curves of one unit share
    an axis, each unit has its own (stacked, sharing ``x``)."""
    xs = dict(x) if isinstance(x, Mapping) else {name: x for name in curves}
    units = {name: ylabel for name in curves} if isinstance(ylabel, str) else dict(ylabel)
    groups = {}
    for name in curves:
        groups.setdefault(units[name], []).append(name)
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1 + 3 * len(groups)), sharex=True, squeeze=False)
    for ax, (unit, names) in zip(axes[:, 0], groups.items()):
        for name in names:
            ax.plot(xs[name], curves[name], marker="o" if len(xs[name]) < 30 else None, label=name)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1, 0].set_xlabel(xlabel)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(images: torch.Tensor, image_shape: Sequence[int], ncol: int | None = None) -> torch.Tensor:
    """Tile ``(n, prod(image_shape))`` images, ``image_shape`` = (C, H, W), into
    one array with a 1-pixel white border: ``(rows, cols, 3)`` for C = 3 (RGB),
    ``(rows, cols)`` for C = 1, and for any other C each image's channels side
    by side as grey panels, ``(rows, cols * C)``-wide."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    c, h, w = image_shape
    n = images.shape[0]
    imgs = images.detach().float().cpu().reshape(n, c, h, w)
    if c == 3:
        imgs = imgs.permute(0, 2, 3, 1)  # (n, H, W, 3)
    else:
        imgs = imgs.permute(0, 2, 1, 3).reshape(n, h, c * w)  # channels as panels
    w = imgs.shape[2]
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(nrow * (h + 1) + 1, ncol * (w + 1) + 1, *imgs.shape[3:])
    for i, img in enumerate(imgs):
        r, k = divmod(i, ncol)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = img
    return grid


def save_image_grid(
    path: str, images: torch.Tensor, image_shape: Sequence[int], ncol: int | None = None, title: str = ""
) -> None:
    """Save a grid of images with values in [0, 1] as an RGB PNG (no alpha):
    colour for C = 3, grey (dark ink on white, as the digits) otherwise."""
    grid = image_grid(images.clamp(0, 1), image_shape, ncol)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 28 * 0.9 + 0.2, grid.shape[0] / 28 * 0.9 + 0.4))
    if grid.ndim == 3:
        ax.imshow(grid.numpy(), interpolation="nearest")
    else:
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    # Agg writes RGBA; a figure has no transparency to keep.
    Image.open(buffer).convert("RGB").save(path)


def save_scatter(
    path: str,
    points: torch.Tensor,
    title: str = "",
    labels: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Scatter of 2-D points (e.g. toy data or samples) on axes x_1, x_2,
    coloured by label if given; ``names[k]`` names label k in the legend."""
    p = points.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if labels is not None and names is not None:
        labels = labels.cpu()
        for k, name in enumerate(names):
            mine = p[labels == k]
            ax.scatter(mine[:, 0], mine[:, 1], s=3, color=f"C{k}", alpha=0.6, label=name)
        ax.legend(markerscale=4, loc="best")
    else:
        ax.scatter(p[:, 0], p[:, 1], s=3, c=None if labels is None else labels.cpu(), cmap="tab10", alpha=0.6)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layer_kl(
    path: str, kl: Sequence[float], recon: float | None = None, title: str = "", layer: str = "layer l"
) -> None:
    """Per-layer KL of a hierarchical bound on a log scale, the same figure for
    every model: ``kl[l-1]`` = KL at layer l for l = 1..L, the last one the top
    (``kl_top``); for the HVAE kl_1..kl_L, for the diffusion chain L_1..L_{T-1}
    then L_T. ``recon`` (E_q log p(x | layer 1)), when given, is a horizontal line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = range(1, len(kl) + 1)
    ax.plot(layers, kl, marker="o" if len(kl) < 30 else None, label="KL per layer")
    ax.plot([len(kl)], [kl[-1]], "s", color="C3", label=f"top: kl_top = {kl[-1]:.3g}")
    if recon is not None:
        ax.axhline(-recon, color="k", ls="--", label=f"-recon = {-recon:.3g}")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(layer)
    ax.set_ylabel("nats per example")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
