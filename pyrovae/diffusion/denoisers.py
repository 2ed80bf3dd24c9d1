"""Denoisers for p_theta(x_{t-1} | x_t): plain ``nn.Module``s mapping
``(x_t, t) -> prediction``, no Pyro inside.

Every denoiser takes flat ``x`` of shape ``(N, D)`` and a float time ``t`` of
shape ``(N,)`` (the chain passes t rescaled to 0..1000 so that one embedding
serves every T) and returns ``(N, out_mult * D)``: the prediction (eps, x_0 or
the mean) and, with ``out_mult = 2``, the variance interpolation weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times ``t`` of shape ``(N,)``:
    ``[cos(t w_k), sin(t w_k)]`` with frequencies w_k = max_period^(-k/(dim/2)),
    shape ``(N, dim)`` (Vaswani et al. 2017; Ho et al. 2020)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a float tensor (times rescaled to 0..1000), got dtype {t.dtype}")
    half = dim // 2
    # in t's dtype, so that a float64 denoiser gets a float64 embedding
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class TimeEmbedding(nn.Sequential):
    """``t -> MLP(sinusoidal(t))``, shape ``(N, dim)``."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_embedding(t, self.dim))


def _check_call(x: torch.Tensor, t: torch.Tensor, x_dim: int) -> None:
    if x.dim() != 2 or x.shape[1] != x_dim:
        raise ValueError(f"x must have shape (N, {x_dim}), got {tuple(x.shape)}")
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")


class TimeMLP(nn.Module):
    """A residual MLP for vectors (2-D toys, 8x8 digits): each block adds a
    projection of the time embedding before its activation,

        h <- h + W_2 SiLU(W_1 LayerNorm(h) + U emb(t)).
    """

    def __init__(self, x_dim: int, hidden: Sequence[int] = (256, 256, 256), time_dim: int = 64, out_mult: int = 1):
        super().__init__()
        hidden = list(hidden)
        if x_dim < 1 or not hidden or any(h < 1 for h in hidden) or len(set(hidden)) != 1:
            raise ValueError(
                f"x_dim must be >= 1 and hidden a non-empty list of one repeated width >= 1, got {x_dim}, {hidden}"
            )
        if out_mult not in (1, 2):
            raise ValueError(f"out_mult must be 1 or 2, got {out_mult}")
        width = hidden[0]
        self.x_dim, self.out_mult = x_dim, out_mult
        self.time = TimeEmbedding(time_dim)
        self.inp = nn.Linear(x_dim, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width),
                    "lin1": nn.Linear(width, width),
                    "temb": nn.Linear(time_dim, width),
                    "lin2": nn.Linear(width, width),
                }
            )
            for _ in hidden
        )
        self.out = nn.Linear(width, out_mult * x_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_call(x, t, self.x_dim)
        emb = self.time(t)
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["lin2"](F.silu(b["lin1"](b["norm"](h)) + b["temb"](emb)))
        return self.out(F.silu(h))


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the time embedding, GroupNorm -> SiLU ->
    dropout -> conv (zero-initialised, so each block starts as the identity),
    plus a 1x1 skip when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net for images (28x28 trains on CPU in minutes): per level one
    residual block, stride-2 convolutions down, nearest-neighbour upsampling
    plus convolution up, skip connections by concatenation, a time embedding
    added in every block, no attention.

    :param image_shape: ``(C, H, W)`` of one example; inputs arrive flat.
    :param channels: base width; level k has ``channels * channel_mult[k]``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        out_mult: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
        if channels < 1 or not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channels and channel_mult must be >= 1, got {channels}, {tuple(channel_mult)}")
        if out_mult not in (1, 2):
            raise ValueError(f"out_mult must be 1 or 2, got {out_mult}")
        c = image_shape[0]
        self.image_shape, self.out_mult = tuple(image_shape), out_mult
        self.x_dim = math.prod(image_shape)
        time_dim = 4 * channels
        self.time = TimeEmbedding(time_dim)
        widths = [channels * m for m in channel_mult]
        self.inp = nn.Conv2d(c, channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = channels
        for k, w in enumerate(widths):
            self.down.append(ResBlock(prev, w, time_dim, dropout))
            self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if k < len(widths) - 1 else nn.Identity())
            prev = w
        self.mid = nn.ModuleList([ResBlock(prev, prev, time_dim, dropout), ResBlock(prev, prev, time_dim, dropout)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for k, w in reversed(list(enumerate(widths))):
            self.up.append(ResBlock(prev + w, w, time_dim, dropout))
            self.upsample.append(nn.Conv2d(w, w, 3, padding=1) if k > 0 else nn.Identity())
            prev = w
        self.out_norm = nn.GroupNorm(_groups(prev), prev)
        self.out = nn.Conv2d(prev, out_mult * c, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_call(x, t, self.x_dim)
        emb = self.time(t)
        h = self.inp(x.reshape(-1, *self.image_shape))
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        for block, up in zip(self.up, self.upsample):
            skip = skips.pop()
            # odd sizes (7 -> 4 -> 7) round on the way down; match the skip's size
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest") if h.shape[-2:] != skip.shape[-2:] else h
            h = block(torch.cat([h, skip], 1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape[0], -1)
