"""Denoisers for p_theta(x_{t-1} | x_t): plain ``nn.Module``s mapping
``(x_t, t) -> prediction``, or ``(x_t, t, y) -> prediction`` when built with
``num_classes`` or ``y_shape`` (class-conditional, as improved-diffusion's
U-Net: an embedding of y is added to the time embedding), no Pyro inside.

Every denoiser takes flat ``x`` of shape ``(N, D)`` and a float time ``t`` of
shape ``(N,)`` (the chain passes t rescaled to 0..1000 so that one embedding
serves every T) and returns ``(N, out_mult * D)``: the prediction (eps, x_0 or
the mean) and, with ``out_mult = 2``, the variance interpolation weights. A
conditional denoiser takes ``y`` of shape ``(N,)`` (classes, -1 the null class
of classifier-free guidance) or ``(N, *y_shape)`` (floats; zeros the null
input); ``y=None`` is the null input for every example.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.nets import Conditioning


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


class LabelEmbedding(nn.Module):
    """y -> a ``dim``-vector added to the time embedding: a linear map, without
    bias, of y's :class:`~pyrovae.nets.Conditioning` features (one-hot classes,
    or the flattened float y), so the null input (class -1, a zero float y, or
    ``y=None``) embeds to zero and a zero weight gives the unconditional denoiser."""

    def __init__(self, dim: int, num_classes: int | None = None, y_shape=None):
        super().__init__()
        self.conditioning = Conditioning(num_classes, y_shape)
        self.proj = nn.Linear(self.conditioning.dim, dim, bias=False)

    def forward(self, y: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if y is None:
            return like.new_zeros(batch, self.proj.out_features)
        y = self.conditioning.check(y, batch, null=True)
        return self.proj(self.conditioning.features(y, like.dtype))


def label_embedding(dim: int, num_classes, y_shape) -> LabelEmbedding | None:
    """A :class:`LabelEmbedding` for a conditional denoiser, ``None`` for an unconditional one."""
    return None if num_classes is None and y_shape is None else LabelEmbedding(dim, num_classes, y_shape)


def conditioned_embedding(net: nn.Module, emb: torch.Tensor, y, batch: int) -> torch.Tensor:
    """The time embedding plus y's where ``net`` is conditional; a clear error
    for a y given to an unconditional denoiser."""
    if net.label is None:
        if y is not None:
            raise ValueError(
                f"this {type(net).__name__} is unconditional (built without num_classes or y_shape), got y"
            )
        return emb
    return emb + net.label(y, batch, emb)


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

    def __init__(
        self,
        x_dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        time_dim: int = 64,
        out_mult: int = 1,
        num_classes: int | None = None,
        y_shape=None,
    ):
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
        # last, so an unconditional net and its conditional twin draw the same initial weights
        self.label = label_embedding(time_dim, num_classes, y_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_call(x, t, self.x_dim)
        emb = conditioned_embedding(self, self.time(t), y, x.shape[0])
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
    :param num_classes: / ``y_shape``: a class-conditional U-Net (module docstring).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        out_mult: int = 1,
        dropout: float = 0.0,
        num_classes: int | None = None,
        y_shape=None,
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
        self.label = label_embedding(time_dim, num_classes, y_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_call(x, t, self.x_dim)
        emb = conditioned_embedding(self, self.time(t), y, x.shape[0])
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


def check_guidance(guidance) -> float | None:
    """``guidance`` (classifier-free guidance's weight w) if it is ``None`` or a number >= 0."""
    if guidance is None:
        return None
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
        raise ValueError(f"guidance must be a number w >= 0 (0: the conditional model itself), got {guidance!r}")
    return float(guidance)


class Conditioned:
    """A conditional denoiser at a fixed y, seen as an unconditional one
    ``(x, t) -> prediction``: ``net(x, t, y)``, or with ``guidance`` w the
    classifier-free guided prediction (Ho & Salimans 2022)

        eps_w(x_t, t) = (1 + w) eps(x_t, t, y) - w eps(x_t, t, null)

    (with a learned variance only the prediction is guided; the variance
    weights stay the conditional ones). w = 0 is ``net(x, t, y)`` exactly.
    A guided denoiser belongs to no model of p(x | y): its samples are not draws
    from the model, and no bound is ever computed with it.

    ``y`` has one entry per example of a batch of B; the networks are called on
    k B rows (k particles, or k times, of each example, in that order: the
    chain's and VDM's flattening of ``(k, B, D)``), so y is tiled k times. Every
    other attribute is the network's.
    """

    def __init__(self, net: nn.Module, y: torch.Tensor, guidance: float | None = None):
        self.net, self.y, self.guidance = net, y, check_guidance(guidance)

    def __getattr__(self, name: str):
        if name in ("net", "y", "guidance"):  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.net, name)

    def _tiled(self, y: torch.Tensor, rows: int) -> torch.Tensor:
        if rows % len(y):
            raise ValueError(f"y has {len(y)} entries, which do not tile a batch of {rows} rows")
        k = rows // len(y)
        return y if k == 1 else y.repeat(k, *([1] * (y.dim() - 1)))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self._tiled(self.y, len(x))
        out = self.net(x, t, y)
        if self.guidance is None:
            return out
        null = torch.zeros_like(y) if y.is_floating_point() else torch.full_like(y, -1)
        w, uncond = self.guidance, self.net(x, t, null)
        if getattr(self.net, "out_mult", 1) == 2:
            (pred, v), (pred_null, _) = out.chunk(2, -1), uncond.chunk(2, -1)
            return torch.cat([(1 + w) * pred - w * pred_null, v], -1)
        return (1 + w) * out - w * uncond


def conditioned(model, y: torch.Tensor, guidance: float | None = None):
    """``model`` (a :class:`~pyrovae.diffusion.chain.DiffusionChain` or
    :class:`~pyrovae.diffusion.vdm.VDM` with a conditional denoiser) with its
    network fixed at ``y`` (and guided with weight ``guidance``;
    :class:`Conditioned`): a shallow copy sharing every parameter, module and
    cached table, so that each of the model's methods (its steps, bound terms
    and samplers) is the conditional one without taking y itself."""
    net = model.net
    if getattr(net, "label", None) is None:
        raise ValueError(
            f"the {type(model).__name__}'s denoiser is unconditional (built without num_classes or y_shape); "
            "it takes no y or guidance"
        )
    if not torch.is_tensor(y) or y.dim() < 1 or len(y) == 0:
        raise TypeError(f"y must be a tensor with one entry per example, got {type(y).__name__}")
    copy_ = copy.copy(model)
    # an instance attribute shadows the registered module: parameters, state_dict and param-store
    # names stay the model's own
    copy_.__dict__["net"] = Conditioned(net, y, guidance)
    return copy_
