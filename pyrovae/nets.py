"""Plain ``nn.Module`` networks: no Pyro inside, so they can be reused anywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pyrovae.registry import lookup

ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def first_parameter(module: nn.Module) -> torch.Tensor | None:
    """``next(module.parameters(), None)``, found by walking the submodules'
    dicts in the same order: what a model asks for its dtype and device on
    every call of model and guide, without ``parameters()``'s generator of
    prefixed names (several microseconds a call)."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None:
            p = first_parameter(child)
            if p is not None:
                return p
    return None


class MLP(nn.Sequential):
    """``in_dim -> hidden[0] -> ... -> out_dim`` with an activation between layers."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "softplus"):
        lookup("activation", activation, ACTIVATIONS)
        dims = [in_dim, *hidden, out_dim]
        for name, d in zip(("in_dim", *["hidden"] * len(hidden), "out_dim"), dims):
            if int(d) < 1:
                raise ValueError(f"{name} must be >= 1, got {d}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


# Convolutional encoder/decoder pair for image VAEs (``--net conv``).


def _conv_sizes(size: int, layers: int) -> list[int]:
    """Spatial sizes after each 4x4, stride-2, padding-1 convolution (halving, rounding down)."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] + 2 - 4) // 2 + 1)
    return sizes


def check_sizes(**sizes: int) -> None:
    """Raise ``ValueError`` naming the first size that is not an integer >= 1."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")


def _conv_feature_sizes(image_shape: Sequence[int], channels: Sequence[int], activation: str):
    """``(C, heights, widths)`` of the feature maps of ``len(channels)`` stride-2
    convolutions over ``image_shape``; a clear error for a shape they cannot take."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    lookup("activation", activation, ACTIVATIONS)
    c, h, w = image_shape
    hs, ws = _conv_sizes(h, len(channels)), _conv_sizes(w, len(channels))
    if min(hs[-1], ws[-1]) < 1:
        raise ValueError(f"image_shape {tuple(image_shape)} is too small for {len(channels)} stride-2 convolutions")
    return c, hs, ws


class ConvEncoderNet(nn.Module):
    """Flat images ``(..., C*H*W) -> (..., out_dim)``: two 4x4 stride-2 convolutions
    (``channels``), then a hidden linear layer and the output layer."""

    def __init__(
        self, image_shape: Sequence[int], out_dim: int, channels=(32, 64), hidden: int = 256, activation: str = "relu"
    ):
        super().__init__()
        c, hs, ws = _conv_feature_sizes(image_shape, channels, activation)
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        for a, b in zip((c, *channels[:-1]), channels):
            layers += [nn.Conv2d(a, b, 4, 2, 1), ACTIVATIONS[activation]()]
        layers += [
            nn.Flatten(),
            nn.Linear(channels[-1] * hs[-1] * ws[-1], hidden),
            ACTIVATIONS[activation](),
            nn.Linear(hidden, out_dim),
        ]
        self.layers = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.layers(x.reshape(-1, *self.image_shape)).reshape(*lead, self.out_dim)


class ConvDecoderNet(nn.Module):
    """``(..., in_dim) -> (..., C*H*W)``: the mirror of :class:`ConvEncoderNet`
    (linear layers up to a ``channels[-1]`` feature map, then 4x4 stride-2
    transposed convolutions, with output padding where a size was odd)."""

    def __init__(
        self, in_dim: int, image_shape: Sequence[int], channels=(32, 64), hidden: int = 256, activation: str = "relu"
    ):
        super().__init__()
        c, hs, ws = _conv_feature_sizes(image_shape, channels, activation)
        self.image_shape = tuple(image_shape)
        self.first = (channels[-1], hs[-1], ws[-1])
        self.stem = nn.Sequential(
            nn.Linear(in_dim, hidden),
            ACTIVATIONS[activation](),
            nn.Linear(hidden, channels[-1] * hs[-1] * ws[-1]),
            ACTIVATIONS[activation](),
        )
        outs = (*reversed(channels[:-1]), c)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(reversed(channels), outs)):
            j = len(channels) - 1 - i  # from size index j+1 back to j
            pad = (hs[j] - (2 * hs[j + 1]), ws[j] - (2 * ws[j + 1]))
            layers.append(nn.ConvTranspose2d(a, b, 4, 2, 1, output_padding=pad))
            if i < len(channels) - 1:
                layers.append(ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*layers)
        self.out_dim = c * hs[0] * ws[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        maps = self.stem(z.reshape(-1, z.shape[-1])).reshape(-1, *self.first)
        return self.layers(maps).reshape(*lead, self.out_dim)


class Conditioning:
    """How a conditioning input y is checked and fed to a network: with
    ``num_classes`` K, y holds integer classes in [0, K), shape ``(B,)``, fed as
    one-hot vectors (K numbers; a learned embedding is the first linear layer's
    columns); with ``y_shape``, y is a float tensor of shape ``(B, *y_shape)``
    (a masked image, say), fed flattened. Exactly one of the two is given.

    ``null=True`` also accepts the class -1, classifier-free guidance's null
    class (y dropped), fed as the zero vector; a float y has no null value of
    its own: the zero tensor is it.
    """

    def __init__(self, num_classes: int | None = None, y_shape=None):
        if (num_classes is None) == (y_shape is None):
            raise ValueError(f"give exactly one of num_classes and y_shape, got {num_classes!r} and {y_shape!r}")
        if num_classes is not None:
            check_sizes(num_classes=num_classes)
            self.dim = num_classes
        else:
            y_shape = (y_shape,) if isinstance(y_shape, int) else tuple(y_shape)
            check_sizes(**{f"y_shape[{i}]": s for i, s in enumerate(y_shape)})
            self.dim = math.prod(y_shape)
        self.num_classes, self.y_shape = num_classes, y_shape

    def check(self, y: torch.Tensor, batch: int, null: bool = False) -> torch.Tensor:
        """``y`` if it is one conditioning input per example of a batch of
        ``batch``, else a ``TypeError``/``ValueError`` saying what was expected."""
        if not torch.is_tensor(y):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if self.num_classes is not None:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(
                    f"y must be integer classes in [0, {self.num_classes}) (this model was built with num_classes="
                    f"{self.num_classes}), got a {y.dtype} tensor"
                )
            if tuple(y.shape) != (batch,):
                raise ValueError(f"y must have shape ({batch},), one class per example, got {tuple(y.shape)}")
            low = -1 if null else 0
            # one reduction: this runs on every training step of a conditional model
            lo, hi = (int(v) for v in torch.aminmax(y)) if len(y) else (low, low)
            if lo < low or hi >= self.num_classes:
                extra = " or -1 (the null class)" if null else ""
                got = f"[{lo}, {hi}]"
                raise ValueError(f"y must be classes in [0, {self.num_classes}){extra}, got values in {got}")
            return y
        if not y.is_floating_point():
            raise TypeError(f"y must be a float tensor of shape (batch, *{self.y_shape}), got dtype {y.dtype}")
        if tuple(y.shape) != (batch, *self.y_shape):
            raise ValueError(f"y must have shape ({batch}, *{self.y_shape}), got {tuple(y.shape)}")
        return y

    def features(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The network's input for a checked ``y``: ``(B, dim)`` one-hot classes
        (zeros for the null class -1) or the flattened float y."""
        if self.num_classes is None:
            return y.reshape(len(y), self.dim).to(dtype)
        # one comparison: the null class matches no column (one_hot would check y's range again, and -1 needs a mask)
        return (y[:, None] == torch.arange(self.num_classes, device=y.device)).to(dtype)
