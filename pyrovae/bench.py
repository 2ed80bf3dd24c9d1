"""``pyrovae bench``: our speed against a hand-written PyTorch floor and Pyro's
stock ELBOs, measured side by side in one run and reported as ratios.

Each *case* (a workload at one size) has a set of *variants*: callables that do
the same work in different ways, one of them the plain-PyTorch floor. Every
variant is warmed up, then each repeat runs every variant once, in an order
rotated from repeat to repeat, so that a burst of load from other processes
hits all of them alike; a variant's figure is the median over repeats, and its
ratio is that median over the floor's.

Workloads:

- ``vae``: one SVI step of the default VAE (784 -> 400 -> 2x50, Bernoulli
  likelihood) at batch 16 and 128.
- ``diffusion``: one training step of the time-subsampled diffusion ELBO.
- ``bound``: the full-T bound (bits/dim) of a batch.
- ``sample``: ancestral sampling with all T steps and strided sampling.
- ``train``: a whole ``pyrovae train vae`` run (training seconds, as
  metrics.csv counts them) against a plain PyTorch loop over the same data,
  networks, optimiser and epochs.

Every floor steps the same optimiser as the library (``torch.optim.Adam``,
fused where the device has it, else multi-tensor: :func:`pyrovae.optim.make_optimizer`),
so that an optimiser the floor lacks cannot make a target look met.

Pyro's validation is off while timing (as for any mature model); the data are
random tensors of the right shape and range, since no step's cost depends on
their values.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from pyrovae.device import resolve_device
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.parts.encoders import MIN_SCALE
from pyrovae.vae import VAE, build_vae

WORKLOADS = ("vae", "diffusion", "bound", "sample", "train", "ddp")
FLOOR = "torch (floor)"
# the trainer's step (pyrovae.train.train_step: LossModule, one torch optimiser, clip norm, finite check)
TRAINER = "pyrovae trainer step"
# stock SVI with pyrovae's one multi-tensor optimiser in pyro.optim's place
SVI_ONE_ADAM = "SVI + pyrovae.optim.Adam"
# the compiled path (pyrovae.compiled): the loss captured once per batch shape, compiled by inductor / replayed as is
TRAINER_COMPILED = "pyrovae trainer step --compile"
TRAINER_CAPTURED = "pyrovae trainer step, captured graph, no inductor"
FLOOR_COMPILED = "torch floor, loss torch.compile'd"
RUN_NO_VALIDATE = "pyrovae train vae --no-validate"
RUN_VALIDATE = "pyrovae train vae (validation on)"
RUN_COMPILED = "pyrovae train vae --no-validate --compile"
DDP = "2 processes, DDP (gloo), 1 thread each"
DDP_NO_SYNC = "2 processes, no gradient all-reduce (no_sync)"


@dataclass
class Sizes:
    """How big and how often: :data:`FULL` for figures, :data:`SMOKE` to check
    that every variant runs (seconds, not minutes)."""

    repeats: int = 31
    warmup: int = 3
    vae_batches: tuple = (16, 128)
    vae_hidden: tuple = (400,)
    vae_z_dim: int = 50
    image_shape: tuple = (1, 28, 28)
    denoisers: tuple = ("mlp", "unet")
    mlp_hidden: tuple = (256, 256, 256)
    unet_channels: int = 32
    diffusion_batch: int = 32
    diffusion_Ts: tuple = (100, 1000)
    literal_T: int = 100
    bound_T: int = 1000
    bound_batch: int = 8
    bound_T_unet: int = 100
    bound_batch_unet: int = 4
    sample_T: int = 1000
    sample_steps: int = 50
    sample_n: int = 64
    slow_repeats: int = 7
    train_data: str = "mnist5k"
    train_size: int | None = None
    train_epochs: int = 2
    train_repeats: int = 5
    # ddp: 2 processes against 1; steps per timed call (a call's figure is ms per step)
    ddp_processes: int = 2
    ddp_vae_batch: int = 128
    ddp_vae_steps: int = 20
    ddp_unet_batch: int = 32
    ddp_unet_T: int = 1000
    ddp_unet_steps: int = 1


FULL = Sizes()
SMOKE = Sizes(
    repeats=2,
    warmup=1,
    vae_batches=(4,),
    vae_hidden=(16,),
    vae_z_dim=2,
    image_shape=(1, 4, 4),
    mlp_hidden=(16, 16),
    unet_channels=4,
    diffusion_batch=4,
    diffusion_Ts=(5, 10),
    literal_T=5,
    bound_T=10,
    bound_batch=2,
    bound_T_unet=5,
    bound_batch_unet=2,
    sample_T=10,
    sample_steps=3,
    sample_n=2,
    slow_repeats=2,
    train_data="digits",
    train_size=32,
    train_epochs=1,
    train_repeats=2,
    ddp_vae_batch=8,
    ddp_vae_steps=2,
    ddp_unet_batch=4,
    ddp_unet_T=10,
)


@dataclass
class Case:
    """One row group of the table: variants doing the same work, the floor
    among them, and the issue's targets (ratio to the floor) per variant."""

    workload: str
    name: str
    variants: dict
    targets: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    # fewer repeats for cases whose calls take seconds (None: Sizes.repeats)
    repeats: int | None = None


@dataclass
class Result:
    workload: str
    case: str
    variant: str
    ms: float
    ratio: float
    times_ms: list = field(default_factory=list)
    target: float | None = None
    params: dict = field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    """What a variant returns when it times itself (a whole training run
    counts its training seconds only, not its set-up, evaluation or figures)."""

    ms: float


def time_variants(variants: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """``{name: [ms per call, one per repeat]}``. Each variant is called
    ``warmup`` times first (JIT compilation, allocator, caches); then every
    repeat calls each variant once, starting one later in the list than the
    repeat before, so no variant always runs first or last. A variant that
    returns :class:`Timed` is counted by its own figure, not the wall clock."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    _synchronize(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            out = variants[name]()
            _synchronize(device)
            times[name].append(out.ms if isinstance(out, Timed) else 1000.0 * (time.perf_counter() - start))
    return times


# --- vae -----------------------------------------------------------------------------


def vae_torch_loss(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """The floor's loss: -ELBO(x) summed over the batch, written in plain torch
    with the VAE's own networks,

        z = mu + sigma * eps,   -ELBO = -sum_d log Bernoulli(x_d; logits_d(z)) + KL(N(mu, sigma^2) || N(0, I)),

    the same estimator ``TraceAnalyticKL_ELBO`` computes (the encoder's MLP is
    called directly: its split and softplus are repeated here)."""
    loc, raw_scale = vae.encoder.net(x).split(vae.z_dim, dim=-1)
    scale = F.softplus(raw_scale) + MIN_SCALE
    z = loc + scale * torch.randn_like(loc)
    log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
    kl = 0.5 * (loc**2 + scale**2 - 1).sum() - scale.log().sum()
    return kl - log_lik


def vae_torch_step(
    vae: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, loss_fn: Callable = vae_torch_loss
) -> float:
    """The floor: one Adam step on :func:`vae_torch_loss` (or ``loss_fn``, the
    same loss compiled)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(vae, x)
    loss.backward()
    optimizer.step()
    return loss.item()


def trainer_step(model, objective, compile: str | None = None) -> Callable:
    """The trainer's step (:func:`pyrovae.train.train_step`) on ``model`` and
    ``objective``, with its own optimiser (:func:`pyrovae.optim.make_optimizer`);
    ``compile="inductor"`` is ``--compile`` (:func:`pyrovae.compiled.compile_loss`),
    ``compile="graph"`` the captured graph replayed without inductor."""
    from pyrovae.compiled import compile_loss
    from pyrovae.optim import make_optimizer
    from pyrovae.train import LossModule, train_step

    loss_fn = LossModule(model, objective)
    if compile is not None:
        loss_fn = compile_loss(loss_fn, backend=None if compile == "graph" else compile)
    parameters = list(model.parameters())
    optimizer = make_optimizer("adam", parameters, 1e-3)
    return lambda x: train_step(loss_fn, parameters, optimizer, x)


def fast_adam(module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The floors' optimiser: the library's (fused, or multi-tensor, torch Adam)."""
    from pyrovae.optim import make_optimizer

    return make_optimizer("adam", module.parameters(), lr)


def vae_cases(sizes: Sizes, device: torch.device):
    """One SVI step of the default VAE per batch size: our analytic-KL ELBO,
    Pyro's four stock ELBOs and the torch floor, all on one VAE (one set of
    parameters in the param store) with their own Adam states."""
    x_dim = math.prod(sizes.image_shape)
    for batch in sizes.vae_batches:
        pyro.clear_param_store()
        vae = build_vae(x_dim, sizes.vae_z_dim, sizes.vae_hidden).to(device)
        x = torch.bernoulli(torch.full((batch, x_dim), 0.3, device=device))
        elbos = {
            "pyrovae TraceAnalyticKL_ELBO": TraceAnalyticKL_ELBO(max_plate_nesting=1),
            "Trace_ELBO": Trace_ELBO(max_plate_nesting=1),
            "TraceMeanField_ELBO": TraceMeanField_ELBO(max_plate_nesting=1),
            "JitTrace_ELBO": JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True),
            "JitTraceMeanField_ELBO": JitTraceMeanField_ELBO(max_plate_nesting=1, ignore_jit_warnings=True),
        }
        from pyrovae.optim import Adam as OneAdam

        variants = {FLOOR: _bind(vae_torch_step, vae, fast_adam(vae, 1e-3), x)}
        for name, elbo in elbos.items():
            svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
            variants[name] = _bind(svi.step, x)
        variants[SVI_ONE_ADAM] = _bind(
            SVI(vae.model, vae.guide, OneAdam({"lr": 1e-3}), loss=TraceAnalyticKL_ELBO(max_plate_nesting=1)).step, x
        )
        variants[TRAINER] = _bind(trainer_step(vae, TraceAnalyticKL_ELBO(max_plate_nesting=1)), x)
        variants[TRAINER_CAPTURED] = _bind(trainer_step(vae, TraceAnalyticKL_ELBO(max_plate_nesting=1), "graph"), x)
        variants[TRAINER_COMPILED] = _bind(trainer_step(vae, TraceAnalyticKL_ELBO(max_plate_nesting=1), "inductor"), x)
        variants[FLOOR_COMPILED] = _bind(vae_torch_step, vae, fast_adam(vae, 1e-3), x, torch.compile(vae_torch_loss))
        # the targets are at batch 128; batch 16 (per-step overhead dominates) is reported
        targets = {TRAINER: 1.10, SVI_ONE_ADAM: 1.15, TRAINER_COMPILED: 1.00} if batch >= 128 else {}
        yield Case("vae", f"batch {batch}", variants, targets, {"batch": batch})


def _bind(fn: Callable, *args) -> Callable:
    return lambda: fn(*args)


# --- diffusion: the floor -------------------------------------------------------------


class TorchDDPM:
    """The diffusion floor: DDPM's training step, forward passes and sampler
    written as plain torch loops around the chain's own network, with the
    schedule's numbers copied out once (as a hand-written DDPM keeps them).

    Its per-t term is the one :meth:`DiffusionChain.vb_terms` computes for the
    chain's default settings (eps prediction, sigma_t^2 = beta_tilde_t with the
    clipped log, discretised Gaussian decoder):

        x0_hat = x_t / sqrt(alpha_bar_t) - sqrt(1/alpha_bar_t - 1) eps_theta(x_t, t)
        L_{t-1} = coef1_t^2 sum_d (x_0 - x0_hat)_d^2 / (2 sigma_t^2)   t >= 2
                (= |mu_tilde_t(x_t, x_0) - mu_tilde_t(x_t, x0_hat)|^2 / (2 sigma_t^2))
        L_0     = -sum_d log p(x_0 | x_1), the Gaussian N(mu, sigma_1^2) over 256 bins.
    """

    def __init__(self, chain):
        if (chain.parameterization, chain.variance, chain.decoder) != ("eps", "beta_tilde", "discretised"):
            raise ValueError(
                "the torch floor is written for parameterization 'eps', variance 'beta_tilde' and the 'discretised' "
                f"decoder, got {chain.parameterization!r}, {chain.variance!r}, {chain.decoder!r}"
            )
        s = chain.schedule
        dtype = next(chain.net.parameters()).dtype
        self.net, self.T, self.x_dim = chain.net, s.T, chain.x_dim
        self.likelihood = chain.likelihood
        names = (
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            "posterior_log_variance_clipped",
        )
        self.tables = {name: getattr(s, name).to(dtype) for name in names}
        self.tau = (s.timesteps * (1000.0 / float(s.timesteps[-1]))).to(dtype)
        self.floats = {name: table.tolist() for name, table in self.tables.items()}
        self.tau_floats = self.tau.tolist()
        self.alpha_bar_T = float(s.alphas_cumprod[-1])

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_T + T * sum over the batch of L_{t-1}(x_0, x_t): the unbiased estimate
        of -ELBO for times ``t`` (B,) drawn uniformly and x_t = q_sample(x_0, t, noise)."""
        tab = {name: table[t - 1, None] for name, table in self.tables.items()}
        x_t = tab["sqrt_alphas_cumprod"] * x0 + tab["sqrt_one_minus_alphas_cumprod"] * noise
        eps = self.net(x_t, self.tau[t - 1])
        x0_hat = tab["sqrt_recip_alphas_cumprod"] * x_t - tab["sqrt_recipm1_alphas_cumprod"] * eps
        log_var = tab["posterior_log_variance_clipped"]
        # mu_tilde(x_t, x_0) - mu_tilde(x_t, x0_hat) = coef1_t (x_0 - x0_hat)
        weight = 0.5 * tab["posterior_mean_coef1"] ** 2 * torch.exp(-log_var)
        kl = weight.squeeze(-1) * (x0 - x0_hat).square().sum(-1)
        # the decoder's term only where t = 1, as the chain scores it
        first = t == 1
        terms = kl
        if first.any():
            mean = tab["posterior_mean_coef1"][first] * x0_hat[first] + tab["posterior_mean_coef2"][first] * x_t[first]
            nll = -_discretised_log_lik(x0[first], mean, 0.5 * log_var[first]).sum(-1)
            terms = kl.masked_scatter(first, nll)
        # L_T = KL(N(sqrt(alpha_bar_T) x_0, 1 - alpha_bar_T) || N(0, 1)), no parameters
        a = self.alpha_bar_T
        prior = 0.5 * (a * x0**2 + (1 - a) - 1 - math.log(1 - a)).sum()
        return prior + self.T * terms.sum()

    def train_step(self, optimizer: torch.optim.Optimizer, x0: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        t = torch.randint(1, self.T + 1, x0.shape[:1], device=x0.device)
        loss = self.loss(x0, t, torch.randn_like(x0))
        loss.backward()
        optimizer.step()
        return loss.item()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z for t = T..2 with
        x0_hat clipped to [-1, 1]; then the decoder's mean given x_1, from the
        chain's own likelihood at mu_theta(x_1, 1) and sigma_1 (the chain's
        return value: for the discretised decoder an expectation over 256 bins
        per pixel, not the clipped mu a hand-written DDPM returns)."""
        f = self.floats
        ref = self.tau
        x = torch.randn(n, self.x_dim, device=ref.device, dtype=ref.dtype)
        for i in range(self.T - 1, -1, -1):
            eps = self.net(x, torch.full((n,), self.tau_floats[i], device=ref.device, dtype=ref.dtype))
            x0_hat = (f["sqrt_recip_alphas_cumprod"][i] * x - f["sqrt_recipm1_alphas_cumprod"][i] * eps).clamp(
                -1.0, 1.0
            )
            x = f["posterior_mean_coef1"][i] * x0_hat + f["posterior_mean_coef2"][i] * x
            if i > 0:
                x = x.add(torch.randn_like(x), alpha=math.exp(0.5 * f["posterior_log_variance_clipped"][i]))
        # what the chain returns: the decoder's mean given x_1 (for the discretised
        # decoder the expectation over its 256 bins, not the clipped mu)
        return self.likelihood(x, torch.full_like(x, math.exp(0.5 * f["posterior_log_variance_clipped"][0]))).mean


def _discretised_log_lik(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log of the N(mean, exp(log_scale)^2) mass of x's bin among the 256 bins of
    [-1, 1] (half-width 1/255; the edge bins reach to -inf and +inf)."""
    inv = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr((x - mean + 1 / 255) * inv)
    cdf_minus = torch.special.ndtr((x - mean - 1 / 255) * inv)
    tiny = torch.finfo(x.dtype).tiny
    mid = (cdf_plus - cdf_minus).clamp(min=tiny).log()
    return torch.where(
        x < -0.999, cdf_plus.clamp(min=tiny).log(), torch.where(x > 0.999, (1 - cdf_minus).clamp(min=tiny).log(), mid)
    )


# --- diffusion workloads ----------------------------------------------------------------


def _chain(sizes: Sizes, denoiser: str, T: int, device: torch.device):
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.denoisers import TimeMLP, UNet
    from pyrovae.diffusion.schedule import NoiseSchedule

    x_dim = math.prod(sizes.image_shape)
    net = TimeMLP(x_dim, sizes.mlp_hidden) if denoiser == "mlp" else UNet(sizes.image_shape, sizes.unet_channels)
    return DiffusionChain(net, NoiseSchedule.from_name("linear", T), x_dim, decoder="discretised").to(device)


def _images(n: int, sizes: Sizes, device: torch.device) -> torch.Tensor:
    """8-bit pixels scaled to the 256 bin centres of [-1, 1]."""
    return torch.randint(0, 256, (n, math.prod(sizes.image_shape)), device=device) / 127.5 - 1


def diffusion_cases(sizes: Sizes, device: torch.device):
    """One training step on the time-subsampled diffusion ELBO per denoiser and
    T: ``DiffusionELBO`` through SVI vs the torch floor (same network, torch
    Adam), and stock ``Trace_ELBO`` on the literal chain (T model sites) for
    the MLP at ``sizes.literal_T`` only: it costs T network calls a step."""
    from pyrovae.infer.diffusion_elbo import DiffusionELBO

    for denoiser in sizes.denoisers:
        for T in sizes.diffusion_Ts:
            pyro.clear_param_store()
            chain = _chain(sizes, denoiser, T, device)
            x0 = _images(sizes.diffusion_batch, sizes, device)
            floor = TorchDDPM(chain)
            variants = {FLOOR: _bind(floor.train_step, fast_adam(chain, 1e-4), x0)}
            svi = SVI(chain.model, chain.guide_posterior, pyro.optim.Adam({"lr": 1e-4}), loss=DiffusionELBO())
            variants["pyrovae DiffusionELBO"] = _bind(svi.step, x0)
            variants[TRAINER] = _bind(trainer_step(chain, DiffusionELBO()), x0)
            if denoiser == "mlp" and T == sizes.literal_T:
                literal = SVI(
                    chain.model,
                    chain.guide_posterior,
                    pyro.optim.Adam({"lr": 1e-4}),
                    loss=Trace_ELBO(max_plate_nesting=1),
                )
                variants["Trace_ELBO literal chain"] = _bind(literal.step, x0)
            # the target is for the image denoisers, where the network's work dominates
            case = f"{denoiser} T={T} batch {sizes.diffusion_batch}"
            # a U-Net step takes most of a second on a CPU: fewer repeats
            repeats = sizes.slow_repeats if denoiser == "unet" else None
            yield Case(
                "diffusion",
                case,
                variants,
                {TRAINER: 1.10 if denoiser == "mlp" else 1.05},
                {"denoiser": denoiser, "T": T},
                repeats,
            )


def _no_grad(fn: Callable, *args) -> Callable:
    def call():
        with torch.no_grad():
            return fn(*args)

    return call


def bound_cases(sizes: Sizes, device: torch.device, chunk_size: int = 512):
    """The full-T bound of a batch (every term, no gradients): ``full_bound``
    (batched over t) against the floor, the denoiser's forward passes alone
    over the same T x B inputs in the same chunks (inputs drawn beforehand).
    For the MLP at ``sizes.bound_T`` also the per-site literal chain under
    Pyro's ``TraceMeanField_ELBO`` and our ``TraceAnalyticKL_ELBO``
    (closed-form KL per site with the posterior-order guide); for the U-Net,
    where the network's work dominates, a shorter chain (``bound_T_unet``)."""
    for denoiser, T, B in (
        ("mlp", sizes.bound_T, sizes.bound_batch),
        ("unet", sizes.bound_T_unet, sizes.bound_batch_unet),
    ):
        pyro.clear_param_store()
        chain = _chain(sizes, denoiser, T, device)
        x0 = _images(B, sizes, device)
        per_call = max(1, chunk_size // B)
        with torch.no_grad():
            t = torch.arange(1, T + 1, device=device)[:, None].expand(T, B)
            x_t = chain.schedule.q_sample(x0.expand(T, B, chain.x_dim), t).reshape(T * B, chain.x_dim)
            tau = (t * (1000.0 / T)).to(x0.dtype).reshape(-1)
        chunks = [(x_t[i : i + per_call * B], tau[i : i + per_call * B]) for i in range(0, T * B, per_call * B)]
        variants = {
            FLOOR: _no_grad(_forwards, chain.net, chunks),
            "pyrovae full_bound (batched over t)": _no_grad(chain.full_bound, x0, chunk_size),
        }
        if denoiser == "mlp":
            variants["TraceMeanField_ELBO per-site chain"] = _no_grad(
                TraceMeanField_ELBO(max_plate_nesting=1).loss, chain.model, chain.guide_posterior, x0
            )
            variants["pyrovae TraceAnalyticKL_ELBO per-site chain"] = _no_grad(
                TraceAnalyticKL_ELBO(max_plate_nesting=1).loss, chain.model, chain.guide_posterior, x0
            )
        yield Case(
            "bound",
            f"{denoiser} T={T} batch {B}",
            variants,
            {"pyrovae full_bound (batched over t)": 1.2},
            {"denoiser": denoiser, "T": T},
            repeats=sizes.slow_repeats,
        )


def _forwards(net, chunks: list) -> None:
    for x, tau in chunks:
        net(x, tau)


def sample_cases(sizes: Sizes, device: torch.device):
    """Ancestral sampling with all T steps and strided sampling on
    ``sizes.sample_steps`` respaced steps: ``DiffusionChain.sample`` against a
    plain torch loop over the same steps (its respaced schedule computed once,
    beforehand)."""
    pyro.clear_param_store()
    chain = _chain(sizes, "mlp", sizes.sample_T, device)
    n = sizes.sample_n
    yield Case(
        "sample",
        f"mlp ancestral T={chain.T} n={n}",
        {FLOOR: _bind(TorchDDPM(chain).sample, n), "pyrovae sample": _bind(chain.sample, n)},
        {"pyrovae sample": 1.05},
        repeats=sizes.slow_repeats,
    )
    strided = TorchDDPM(chain.respaced(sizes.sample_steps))
    variants = {
        FLOOR: _bind(strided.sample, n),
        f"pyrovae sample(steps={sizes.sample_steps})": _bind(chain.sample, n, sizes.sample_steps),
    }
    yield Case(
        "sample",
        f"mlp strided {sizes.sample_steps} of T={chain.T} n={n}",
        variants,
        {f"pyrovae sample(steps={sizes.sample_steps})": 1.1},
    )


# --- train: whole runs ------------------------------------------------------------------


def _run_config(sizes: Sizes, validate: bool, compile: bool = False):
    from pyrovae.config import VAEConfig

    hidden, z_dim = list(sizes.vae_hidden), sizes.vae_z_dim
    return VAEConfig(
        data=sizes.train_data,
        train_size=sizes.train_size,
        epochs=sizes.train_epochs,
        hidden=hidden,
        z_dim=z_dim,
        validate=validate,
        compile=compile,
        quiet=True,
        eval_every=sizes.train_epochs,
    )


def pyrovae_run(cfg) -> Timed:
    """``pyrovae train vae`` in a fresh temporary folder: its training seconds
    (metrics.csv's ``seconds``: the epochs' step loops, not the set-up,
    evaluation, checkpoints or figures)."""
    import dataclasses
    import shutil
    import tempfile

    from pyrovae.train import train

    out = tempfile.mkdtemp(prefix="pyrovae-bench-")
    validation = is_validation_enabled()  # train() sets it for its run; the bench's is off
    try:
        result = train(dataclasses.replace(cfg, out=os.path.join(out, "run")))
        return Timed(1000.0 * result.metrics[-1]["seconds"])
    finally:
        pyro.enable_validation(validation)
        shutil.rmtree(out, ignore_errors=True)


def torch_run(cfg) -> Timed:
    """The floor of a run: a plain PyTorch loop over the same data (shuffled per
    epoch, dynamically binarised), the same networks (``build_vae``), the same
    optimiser and epochs, stepping :func:`vae_torch_step`; timed over its epochs."""
    from pyrovae import data as datasets

    ds = datasets.load_dataset(cfg.data).subset(cfg.train_size, cfg.test_size)
    torch.manual_seed(cfg.seed)
    vae = build_vae(ds.x_dim, cfg.z_dim, tuple(cfg.hidden))
    optimizer = fast_adam(vae, cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    x_train, n = ds.x_train, len(ds.x_train)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            vae_torch_step(vae, optimizer, torch.bernoulli(x_train[order[i : i + cfg.batch_size]]))
    return Timed(1000.0 * (time.perf_counter() - start))


def train_cases(sizes: Sizes, device: torch.device):
    """A whole default ``pyrovae train vae`` run (``sizes.train_epochs`` epochs of
    ``sizes.train_data``) with ``--no-validate``, with validation on and with
    ``--compile`` (its training seconds include the captures and compiles,
    one per batch shape), against the plain torch loop; CPU only (the run
    picks its device from its config)."""
    fast, checked, compiled = (
        _run_config(sizes, False),
        _run_config(sizes, True),
        _run_config(sizes, False, compile=True),
    )
    variants = {
        FLOOR: _bind(torch_run, fast),
        RUN_NO_VALIDATE: _bind(pyrovae_run, fast),
        RUN_VALIDATE: _bind(pyrovae_run, checked),
        RUN_COMPILED: _bind(pyrovae_run, compiled),
    }
    name = f"vae {sizes.train_data} {sizes.train_epochs} epochs"
    yield Case(
        "train",
        name,
        variants,
        {RUN_NO_VALIDATE: 1.15},
        {"data": sizes.train_data, "epochs": sizes.train_epochs},
        repeats=sizes.train_repeats,
    )


# --- ddp: two processes against one --------------------------------------------------------


def _ddp_model(sizes: Sizes, name: str):
    """``(model, objective, global batch)`` of a ddp case, built the same way
    (same seed) in every process: the default VAE or the U-Net diffusion chain."""
    from pyrovae.infer.diffusion_elbo import DiffusionELBO

    torch.manual_seed(0)
    if name == "vae":
        x_dim = math.prod(sizes.image_shape)
        model = build_vae(x_dim, sizes.vae_z_dim, sizes.vae_hidden)
        return (
            model,
            TraceAnalyticKL_ELBO(max_plate_nesting=1),
            torch.bernoulli(torch.full((sizes.ddp_vae_batch, x_dim), 0.3)),
        )
    chain = _chain(sizes, "unet", sizes.ddp_unet_T, torch.device("cpu"))
    return chain, DiffusionELBO(), _images(sizes.ddp_unet_batch, sizes, torch.device("cpu"))


def _ddp_worker(rank: int, world: int, port: int, sizes: Sizes, conn) -> None:
    """One process of the group (one torch thread): the trainer's step
    (:func:`pyrovae.train.train_step`) on its shard of a case's global batch,
    the loss module in ``DistributedDataParallel``. Answers each
    ``(name, steps, sync)`` on ``conn`` with the ms per step between two
    barriers (``sync=False``: the gradients' all-reduce skipped with DDP's
    ``no_sync``, the compute alone); builds each case's model on first use."""
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
                model, objective, batch = _ddp_model(sizes, name)
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
    kept alive across the cases and their repeats; :meth:`steps` times
    ``steps`` steps of a case on all of them and returns rank 0's ms per step
    as :class:`Timed`."""

    def __init__(self, sizes: Sizes, world: int):
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_ddp_worker, args=(rank, world, port, sizes, child), daemon=True)
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


def _one_process_steps(sizes: Sizes, name: str) -> Callable:
    """The floor of a ddp case: the same trainer step in this process (one
    thread, the run's), no process group, on the whole global batch."""
    model, objective, batch = _ddp_model(sizes, name)
    step = trainer_step(model, objective)
    steps = sizes.ddp_vae_steps if name == "vae" else sizes.ddp_unet_steps

    def call() -> Timed:
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        return Timed(1000.0 * (time.perf_counter() - start) / steps)

    return call


def ddp_cases(sizes: Sizes, device: torch.device):
    """The trainer's step on ``sizes.ddp_processes`` gloo processes (one torch
    thread each, DDP around the loss module) against one process with one
    thread, on the same global batch: the default VAE and the U-Net diffusion
    step. Also the processes without the gradients' all-reduce (DDP's
    ``no_sync``): the difference is what the communication costs. CPU only."""
    if device.type != "cpu":
        return
    group = ProcessGroup(sizes, sizes.ddp_processes)
    try:
        for name in ("vae", "unet"):
            batch = sizes.ddp_vae_batch if name == "vae" else sizes.ddp_unet_batch
            steps = sizes.ddp_vae_steps if name == "vae" else sizes.ddp_unet_steps
            variants = {
                FLOOR: _one_process_steps(sizes, name),
                DDP: _bind(group.steps, name, steps, True),
                DDP_NO_SYNC: _bind(group.steps, name, steps, False),
            }
            label = "vae" if name == "vae" else f"unet T={sizes.ddp_unet_T}"
            params = {"model": name, "batch": batch, "processes": sizes.ddp_processes}
            yield Case(
                "ddp",
                f"{label} batch {batch}",
                variants,
                {},
                params,
                repeats=sizes.slow_repeats if name == "unet" else None,
            )
    finally:
        group.close()


def ddp_checks(results: list) -> list:
    """Per ddp case: samples per second with 2 processes and with 1, the speed-up
    (the limit is the number of processes, on as many free cores), and the ms a
    step spends in the gradients' all-reduce (DDP's step less no_sync's)."""
    checks = []
    for case in dict.fromkeys(r.case for r in results if r.workload == "ddp"):
        rows = {r.variant: r for r in results if r.workload == "ddp" and r.case == case}
        one, two, alone = rows[FLOOR], rows[DDP], rows[DDP_NO_SYNC]
        batch, world = one.params["batch"], one.params["processes"]
        checks.append(
            {
                "check": f"ddp {case}: samples/s {world} processes {1000 * batch / two.ms:.0f} vs 1 process {1000 * batch / one.ms:.0f}; "
                f"speed-up {one.ms / two.ms:.2f} (limit {world}); all-reduce {two.ms - alone.ms:.2f} ms of a {two.ms:.2f} ms step",
                "ratio": one.ms / two.ms,
                "limit": world,
                "samples_per_s": {"1": 1000 * batch / one.ms, str(world): 1000 * batch / two.ms},
                "allreduce_ms": two.ms - alone.ms,
            }
        )
    return checks


CASES = {
    "vae": vae_cases,
    "diffusion": diffusion_cases,
    "bound": bound_cases,
    "sample": sample_cases,
    "train": train_cases,
    "ddp": ddp_cases,
}


# --- running and reporting --------------------------------------------------------------


def header(device: torch.device, sizes: Sizes) -> dict:
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "threads": torch.get_num_threads(),
        "repeats": sizes.repeats,
        "warmup": sizes.warmup,
        "slow_repeats": sizes.slow_repeats,
        "train_repeats": sizes.train_repeats,
        "pyro_validation": False,
        "cpus": os.cpu_count(),
        "load_average": _load_average(),
    }


def _load_average() -> list | None:
    """The machine's 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def t_checks(results: list) -> list:
    """The diffusion step's growth with T, per denoiser: DiffusionELBO's ratio
    to the floor at the largest T over that at the smallest (target <= 1.1).
    The floor's cost does not depend on T, so dividing by it cancels the load
    that differs between the two cases, which were not interleaved."""
    ours = [r for r in results if r.workload == "diffusion" and r.variant == "pyrovae DiffusionELBO"]
    checks = []
    for denoiser in dict.fromkeys(r.params["denoiser"] for r in ours):
        rows = sorted((r for r in ours if r.params["denoiser"] == denoiser), key=lambda r: r.params["T"])
        if len(rows) > 1:
            lo, hi = rows[0], rows[-1]
            name = (
                f"diffusion {denoiser}: DiffusionELBO step at T={hi.params['T']} / at T={lo.params['T']} (each x floor)"
            )
            checks.append({"check": name, "ratio": hi.ratio / lo.ratio, "target": 1.1})
    return checks


def compiled_checks(results: list) -> list:
    """Per vae case: the compiled trainer step against the floor compiled the
    same way (``torch.compile`` of its loss), reported beside its target
    against the eager floor."""
    checks = []
    for case in dict.fromkeys(r.case for r in results if r.workload == "vae"):
        rows = {r.variant: r for r in results if r.workload == "vae" and r.case == case}
        if TRAINER_COMPILED in rows and FLOOR_COMPILED in rows:
            ratio = rows[TRAINER_COMPILED].ms / rows[FLOOR_COMPILED].ms
            checks.append({"check": f"vae {case}: {TRAINER_COMPILED} / {FLOOR_COMPILED}: {ratio:.2f}", "ratio": ratio})
    return checks


def run_case(case: Case, sizes: Sizes, device: torch.device) -> list:
    # a slow case's calls take seconds: one warm-up call is enough there
    warmup = 1 if case.repeats else sizes.warmup
    times = time_variants(case.variants, case.repeats or sizes.repeats, warmup, device)
    floor = statistics.median(times[FLOOR])
    results = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        target = case.targets.get(name)
        results.append(Result(case.workload, case.name, name, ms, ms / floor, ts, target, case.params))
    return results


def format_header(head: dict) -> str:
    return "\n".join(
        [
            f"pyrovae bench: device {head['device']}, torch threads {head['threads']}, torch {head['torch']}, pyro {head['pyro']}; "
            f"{head['cpus']} CPUs, load average {head['load_average']}",
            f"median of {head['repeats']} interleaved repeats after {head['warmup']} warm-up calls "
            f"({head['slow_repeats']} after 1 for the U-Net, the full-T bound and ancestral sampling; {head['train_repeats']} after 1 for whole runs); Pyro validation off",
            "",
            f"{'workload':<10} {'case':<30} {'variant':<50} {'ms':>10} {'x floor':>8}  target",
        ]
    )


def format_case(results: list) -> str:
    """One case's rows: ms, ratio to the floor, and the target where there is one."""
    lines = []
    for r in results:
        target = ""
        if r.target is not None:
            target = f"<= {r.target:.2f}  {'met' if r.ratio <= r.target else 'MISSED'}"
        lines.append(f"{r.workload:<10} {r.case:<30} {r.variant:<50} {r.ms:>10.2f} {r.ratio:>8.2f}  {target}")
    return "\n".join(lines)


def format_checks(checks: list) -> str:
    return "\n".join(
        f"{c['check']}: {c['ratio']:.2f}  <= {c['target']:.2f}  {'met' if c['ratio'] <= c['target'] else 'MISSED'}"
        for c in checks
    )


def run(
    workloads=WORKLOADS,
    device: str = "cpu",
    smoke: bool = False,
    repeats: int | None = None,
    json_path: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    log=print,
) -> dict:
    """Run the named workloads; print the table through ``log``, one case at a
    time as it finishes; return (and
    write to ``json_path``) ``{"header": ..., "results": [...], "checks": [...]}``.

    :param threads: torch's intra-op threads for the run (restored afterwards);
        default: whatever torch has.
    """
    for name in workloads:
        if name not in CASES:
            raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(CASES)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    dev = resolve_device(device)
    sizes = SMOKE if smoke else FULL
    if repeats is not None:
        sizes = Sizes(**{**sizes.__dict__, "repeats": repeats})
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        head = header(dev, sizes)
        log(format_header(head))
        results = []
        pyro.set_rng_seed(seed)
        with pyro.validation_enabled(False):
            for name in workloads:
                for case in CASES[name](sizes, dev):
                    rows = run_case(case, sizes, dev)
                    log(format_case(rows) + "\n")
                    results.extend(rows)
    finally:
        torch.set_num_threads(previous_threads)
        pyro.clear_param_store()
    checks = t_checks(results)
    if checks:
        log(format_checks(checks))
    compiled = compiled_checks(results)
    ddp = ddp_checks(results)
    for c in compiled + ddp:
        log(c["check"])
    head["load_average_end"] = _load_average()
    log(f"load average (1, 5, 15 min) at the start {head['load_average']}, at the end {head['load_average_end']}")
    report = {
        "header": head,
        "results": [r.__dict__ for r in results],
        "checks": checks,
        "compiled": compiled,
        "ddp": ddp,
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
