"""Worker processes for the ddp cases: a group of gloo processes, each
stepping the trainer on its shard of a batch, kept alive across cases."""

from __future__ import annotations

import time
from collections.abc import Callable

import pyro
import torch

from pyrovae.bench.harness import Sizes, Timed


def _ddp_worker(rank: int, world: int, port: int, sizes: Sizes, build: Callable, conn) -> None:
    """One process of the group (one torch thread): the trainer's step
    (:func:`pyrovae.train.train_step`) on its shard of a case's global batch,
    the loss module in ``DistributedDataParallel``. Answers each
    ``(name, steps, sync)`` on ``conn`` with the ms per step between two
    barriers (``sync=False``: the gradients' all-reduce skipped with DDP's
    ``no_sync``, the compute alone); builds each case's model on first use,
    ``build(sizes, name)`` -> ``(model, objective, global batch)``."""
    import contextlib

    import torch.distributed as dist

    from pyrovae.optim import make_optimizer
    from pyrovae.train import LossModule, train_step

    torch.set_num_threads(1)
    pyro.enable_validation(False)
    built = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        pyro.set_rng_seed(rank)
        conn.send("ready")
        while True:
            command = conn.recv()
            if command is None:
                break
            name, steps, sync = command
            if name not in built:
                model, objective, batch = build(sizes, name)
                loss_fn = torch.nn.parallel.DistributedDataParallel(LossModule(model, objective))
                parameters = list(model.parameters())
                built[name] = (loss_fn, parameters, make_optimizer("adam", parameters, 1e-4), batch[rank::world])
            loss_fn, parameters, optimizer, shard = built[name]
            with contextlib.nullcontext() if sync else loss_fn.no_sync():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    train_step(loss_fn, parameters, optimizer, shard)
                dist.barrier()
            conn.send(1000.0 * (time.perf_counter() - start) / steps)
    except BaseException as err:  # the parent waits on conn: tell it
        conn.send(err)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ProcessGroup:
    """``world`` worker processes (:func:`_ddp_worker`, started with ``spawn``)
    kept alive across the cases and their repeats, each building a case's model
    with ``build`` (a module-level function, so that it reaches a spawned
    process by name); :meth:`steps` times
    ``steps`` steps of a case on all of them and returns rank 0's ms per step
    as :class:`Timed`."""

    def __init__(self, sizes: Sizes, world: int, build: Callable):
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_ddp_worker, args=(rank, world, port, sizes, build, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for reply in self._replies():
            if reply != "ready":
                raise RuntimeError(f"a ddp worker did not start: {reply!r}")

    def _replies(self) -> list:
        replies = [conn.recv() for conn in self.conns]
        for reply in replies:
            if isinstance(reply, BaseException):
                self.close()
                raise RuntimeError(f"a ddp worker failed: {type(reply).__name__}: {reply}") from reply
        return replies

    def steps(self, name: str, steps: int, sync: bool = True) -> Timed:
        for conn in self.conns:
            conn.send((name, steps, sync))
        return Timed(self._replies()[0])

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
