"""Multi-process training on ``torch.distributed`` (what ``torchrun`` launches).

The trainer takes the all-reduce route (as Horovod's optimiser does in Pyro's
``examples/svi_horovod.py``): every process computes the ELBO's gradients on
its own shard of the global batch, the gradients are summed over processes,
and every process takes the same optimiser step. The ELBO of a plate is a sum
over its examples, so the summed gradient is exactly the gradient of the
global batch's ELBO, and parameters that start equal (:func:`broadcast_module`)
stay equal. This needs no wrapper module around the model and guide, so the
parameters stay the ones in Pyro's param store.

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


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_reduce_grads(params: list, loss: float) -> float:
    """Sum the gradients of ``params`` (same order on every process) and the
    loss over processes, in place; return the summed loss.

    A parameter some process did not use counts as a zero gradient there.
    """
    if world_size() == 1:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    # float64 so that the summed loss of a large batch keeps its digits
    total = torch.tensor([loss], dtype=torch.float64, device=flat.device)
    dist.all_reduce(total)
    return total.item()


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
