"""Parameters belong to their modules: any number of models of every class (the
VAE, the HVAE, M2, the diffusion chain, VDM) live in one session, and stock
``SVI`` + ``pyro.optim.Adam`` trains each one's own tensors (:mod:`pyrovae.params`).
Before the HVAE registered through :func:`pyrovae.params.module`, a second HVAE
in a session stepped the first one's tensors and its own loss stayed flat."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

from pyrovae import data as datasets
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP
from pyrovae.diffusion.gamma import LinearGamma
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.diffusion.vdm import VDM
from pyrovae.hvae import build_hvae
from pyrovae.infer.vdm_elbo import VDMELBO
from pyrovae.ssvae import SSVAE
from pyrovae.vae import build_vae


def two_patterns(n=64, d=20):
    """Binary data of two prototypes: learnable in 100 steps (about 14 -> 1 nats)."""
    g = torch.Generator().manual_seed(5)
    prototypes = (torch.rand(2, d, generator=g) < 0.5).float()
    return prototypes[torch.randint(2, (n,), generator=g)]


def eight_bit(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# name -> (a new model, its data (the arguments of model and guide), its objective).
# Each model with a Pyro model/guide pair over its latents is trained with stock
# Trace_ELBO, M2 on unlabelled data with stock TraceEnum_ELBO (it sums its class y,
# so the classifier is trained too); the continuous-time VDM has no per-site pair (its
# latent is a continuum), so with its own VDMELBO.
MODELS = {
    "vae": (lambda: build_vae(20, 2, (16,)), two_patterns, lambda: Trace_ELBO()),
    "hvae": (lambda: build_hvae(20, (4, 2), (16,)), two_patterns, lambda: Trace_ELBO()),
    "hvae top-down": (lambda: build_hvae(20, (4, 2), (16,), encoder="top-down"), two_patterns, lambda: Trace_ELBO()),
    "diffusion chain": (
        lambda: DiffusionChain(TimeMLP(2, (32, 32), time_dim=8), NoiseSchedule(torch.tensor([0.1, 0.25, 0.4])), 2),
        lambda: datasets.make_moons(64, seed=3)[0],
        lambda: Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    ),
    "m2": (lambda: SSVAE(20, 2, z_dim=2, hidden=(16,)), two_patterns, lambda: TraceEnum_ELBO(max_plate_nesting=1)),
    "vdm": (
        lambda: VDM(TimeMLP(4, (16,)), LinearGamma(), 4),
        lambda: eight_bit(torch.randn(64, 4, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.3),
        lambda: VDMELBO(num_particles=4),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_two_models_of_a_class_train_one_after_the_other_in_one_session(name):
    make, data, objective = MODELS[name]
    pyro.set_rng_seed(0)
    x = data()
    for _ in range(2):
        model = make()
        svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), loss=objective())
        before = {k: v.clone() for k, v in model.named_parameters()}
        losses = [svi.step(x) for _ in range(100)]
        assert [k for k, v in model.named_parameters() if torch.equal(before[k], v)] == []  # its own tensors trained
        # a model stepping another model's tensors stays at its initial loss
        assert sum(losses[-10:]) < sum(losses[:10]), losses
