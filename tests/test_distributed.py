"""Multi-process training: 2 gloo processes launched here, as torchrun would."""

import os
import socket

import pyro.distributions as dist
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

from pyrovae import distributed
from pyrovae.compiled import CompiledLoss
from pyrovae.infer import make_elbo
from pyrovae.nets import MLP
from pyrovae.parts.encoders import DiagonalNormalEncoder
from pyrovae.train import LossModule, TrainConfig, train, train_step
from pyrovae.vae import VAE

WORLD = 2
X_DIM, Z_DIM = 6, 2


class FixedNoiseNormal(dist.Normal):
    """N(loc, scale) whose reparameterised draw uses the given noise eps:
    z = loc + scale * eps, so a draw depends on its example, not on a process's RNG."""

    def __init__(self, loc, scale, eps):
        super().__init__(loc, scale)
        self.eps = eps

    def expand(self, batch_shape, _instance=None):
        return FixedNoiseNormal(
            self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.eps.expand(batch_shape)
        )

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.scale * self.eps


class FixedNoiseEncoder(DiagonalNormalEncoder):
    """q_phi(z|x) with noise eps = sin(x W) from a fixed matrix W: seeded per example."""

    def __init__(self):
        super().__init__(X_DIM, Z_DIM, (5,))
        self.register_buffer("w", torch.randn(X_DIM, Z_DIM, generator=torch.Generator().manual_seed(7)))

    def forward(self, x):
        q = super().forward(x).base_dist
        return FixedNoiseNormal(q.loc, q.scale, torch.sin(3 * x @ self.w)).to_event(1)


def fixed_noise_vae():
    torch.manual_seed(0)
    return VAE(FixedNoiseEncoder(), MLP(Z_DIM, (5,), X_DIM), X_DIM, Z_DIM)


def global_batch():
    return torch.bernoulli(torch.rand(8, X_DIM, generator=torch.Generator().manual_seed(1)))


def one_step(vae, x):
    """One SGD step of the trainer (DDP around the loss module with several
    processes): SGD, so that a gradient off by the factor of the number of
    processes shows in full."""
    loss_fn = distributed.wrap(LossModule(vae, make_elbo("trace")), torch.device("cpu"))
    loss, _ = train_step(loss_fn, list(vae.parameters()), torch.optim.SGD(vae.parameters(), lr=0.05), x)
    return loss, {k: v.detach().clone() for k, v in vae.state_dict().items()}


def compiled_steps(vae, x, compile: bool, steps: int = 2):
    """``steps`` SGD steps of the trainer on the analytic-KL ELBO, its loss
    captured into a graph (pyrovae.compiled: the first step captures, the
    next replay) when ``compile``, inside DDP with several processes."""
    loss_module = LossModule(vae, make_elbo("analytic"))
    if compile:
        loss_module = CompiledLoss(loss_module, backend=None)
    loss_fn = distributed.wrap(loss_module, torch.device("cpu"))
    optimizer = torch.optim.SGD(vae.parameters(), lr=0.05)
    losses = [train_step(loss_fn, list(vae.parameters()), optimizer, x)[0] for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in vae.state_dict().items()}


def worker(rank, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        # rank r takes examples r, r+2, ... of the global batch, as the trainer's sampler does
        loss, params = one_step(fixed_noise_vae(), global_batch()[rank::WORLD])
        compiled = compiled_steps(fixed_noise_vae(), global_batch()[rank::WORLD], compile=True)
        cfg = TrainConfig(
            data="digits",
            train_size=48,
            test_size=32,
            batch_size=16,
            z_dim=3,
            hidden=[8],
            epochs=1,
            quiet=True,
            out=os.path.join(out, "run"),
        )
        result = train(cfg)
        torch.save(
            {
                "loss": loss,
                "step": params,
                "compiled": compiled,
                "trained": result.model.state_dict(),
                "rows": len(result.metrics),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_process_step_equals_one_process_step_on_the_global_batch(ranks):
    _, (r0, r1) = ranks
    loss, params = one_step(fixed_noise_vae(), global_batch())
    assert r0["loss"] == pytest.approx(loss, rel=1e-6) and r1["loss"] == r0["loss"]
    for k, v in params.items():
        torch.testing.assert_close(r0["step"][k], v, rtol=1e-5, atol=1e-6)


def test_ddp_around_the_captured_loss_takes_the_single_process_eager_steps(ranks):
    _, (r0, r1) = ranks
    losses, params = compiled_steps(fixed_noise_vae(), global_batch(), compile=False)
    for rank in (r0, r1):
        got_losses, got_params = rank["compiled"]
        assert got_losses == pytest.approx(losses, rel=1e-6)
        for k, v in params.items():
            torch.testing.assert_close(got_params[k], v, rtol=1e-5, atol=1e-6)


def test_ranks_hold_identical_parameters_after_training(ranks):
    _, (r0, r1) = ranks
    for k, v in r0["trained"].items():
        assert torch.equal(v, r1["trained"][k]), k
    assert len(r0["trained"]) > 0


def test_only_rank_zero_evaluates_and_writes(ranks):
    out, (r0, r1) = ranks
    assert (r0["rows"], r1["rows"]) == (1, 0)
    assert sorted(os.listdir(out / "run")) == sorted(
        [
            "config.json",
            "metrics.csv",
            "model.pt",
            "checkpoint.pt",
            "test-split.pt",
            "loss.png",
            "samples.png",
            "reconstructions.png",
        ]
    )
    assert len(torch.load(out / "run" / "checkpoint.pt", weights_only=True)["rng"]) == WORLD


def test_rank_shards_interleave_into_the_single_process_global_batches(monkeypatch):
    from pyrovae import train as training

    x = torch.arange(40.0).unsqueeze(1)
    cfg = TrainConfig(batch_size=8, seed=3)

    def batches(world, rank):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        loader, sampler = training.make_shard_loader(x, torch.zeros(40), cfg)
        sampler.set_epoch(2)
        return [xb.flatten() for xb, _ in loader]

    single = batches(1, 0)
    shards = [batches(2, r) for r in range(2)]
    assert len(single) == len(shards[0]) == 5
    for k, batch in enumerate(single):
        assert torch.equal(torch.stack([shards[0][k], shards[1][k]], 1).flatten(), batch)
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be a multiple of the number of processes \(3\)"):
        batches(3, 0)
