"""Multi-process training on torch's ``DistributedDataParallel`` (what ``torchrun`` launches).

The trainer wraps its loss module (:class:`pyrovae.train.LossModule`, whose
``forward`` is the objective's loss of a batch) in DDP, the pattern of Pyro's
``examples/svi_lightning.py``: every process computes the loss of its own
shard of the global batch, DDP's bucketed all-reduce overlaps with the
backward pass, and every process takes the same optimiser step. DDP copies
rank 0's parameters and buffers to the others when it wraps the module, and
*averages* the gradients; since the ELBO of a plate is a sum over its
examples, :func:`pyrovae.train.train_step` scales the backward pass by the
number of processes W, so that W processes take exactly the step one
process takes on the global batch.

Launch, one node (CPU: gloo; CUDA: NCCL, one GPU per process)::

    torchrun --nproc_per_node=2 -m pyrovae train vae --batch-size 128

Several nodes: torchrun's usual flags on each node, e.g.
``torchrun --nnodes=2 --node_rank=R --nproc_per_node=4
--master_addr=HOST0 --master_port=29500 -m pyrovae train ...``.
``--batch-size`` is the global batch (a multiple of the number of processes).

A single process (no ``WORLD_SIZE`` in the environment, or 1) needs no
``torch.distributed`` at all: every function here is then a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env(device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group ``torchrun`` describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with NCCL on
    CUDA and gloo on CPU.

    :returns: ``(device, started)``: on CUDA the device becomes
        ``cuda:LOCAL_RANK``; ``started`` says whether this call created the
        group (and so :func:`shutdown` should end it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def shutdown(started: bool) -> None:
    if started:
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` when there are several
    processes (on CUDA with this process's device), else ``module`` itself."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over processes (a new tensor; ``tensor`` itself with one process)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along the first dimension, in
    rank order (the same shape on every process); ``tensor`` with one process."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
