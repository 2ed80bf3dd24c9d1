"""Batches: a ``DataLoader`` that gathers a whole batch at once."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from pyrovae.checks import check_positive
from pyrovae.data.spec import LazyRows


def example_dataset(x: torch.Tensor | LazyRows, y: torch.Tensor) -> torch.utils.data.Dataset:
    """``(x, y)`` pairs indexable by a list of indices (one gather per batch):
    a ``TensorDataset``, or for lazy rows one that reads them from disk."""
    if isinstance(x, LazyRows):
        return _LazyPairs(x, y.cpu())
    return TensorDataset(x, y)


class _LazyPairs(torch.utils.data.Dataset):
    def __init__(self, x: LazyRows, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


def make_loader(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch_size: int = 128,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader yielding ``(x_batch, y_batch)`` by fancy indexing whole batches.

    Batches are drawn as index lists (a ``BatchSampler`` as the sampler), so a
    batch is one tensor gather (or one read of lazy rows, in ``num_workers``
    worker processes) rather than ``batch_size`` item look-ups.
    """
    check_positive(batch_size, "batch_size")
    if len(x) == 0:
        raise ValueError("cannot make a loader over an empty dataset (x has 0 rows)")
    y = torch.zeros(len(x), dtype=torch.long, device=getattr(x, "device", "cpu")) if y is None else y
    ds = example_dataset(x, y)
    base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(
        ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None, num_workers=num_workers
    )
