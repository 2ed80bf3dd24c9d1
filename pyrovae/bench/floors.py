"""The floors: the same work written by hand in plain PyTorch, around the
library's own networks and optimiser, that every variant is measured against."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pyrovae.bench.harness import Timed
from pyrovae.parts.encoders import MIN_SCALE
from pyrovae.vae import VAE, build_vae


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


def fast_adam(module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The floors' optimiser: the library's (fused, or multi-tensor, torch Adam)."""
    from pyrovae.optim import make_optimizer

    return make_optimizer("adam", module.parameters(), lr)


class TorchDDPM:
    """The diffusion floor: DDPM's training step, forward passes and sampler
    written as plain torch loops around the chain's own network, with the
    schedule's numbers copied out once (as a hand-written DDPM keeps them).

    Its per-t term is the one :meth:`DiffusionChain.vb_terms` computes for the
    chain's default settings (eps prediction, sigma_t^2 = beta_tilde_t with the
    clipped log, discretised Gaussian decoder)::

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
