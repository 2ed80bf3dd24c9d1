import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyrovae import data as datasets
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.infer.losses import HybridLoss, SimpleLoss, make_objective

BETAS = [0.1, 0.25, 0.4, 0.6]  # T = 4, alpha_bar_T ~ 0.2: every term matters


def small_chain(parameterization="eps", variance="beta_tilde", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = TimeMLP(2, (16, 16), time_dim=8, out_mult=2 if variance == "learned" else 1)
    return DiffusionChain(net, NoiseSchedule(torch.tensor(BETAS)), 2, "gaussian", parameterization, variance).to(dtype)


def two_d_data(n=8, dtype=torch.float32):
    return datasets.make_moons(n, seed=3)[0].to(dtype)


def test_log_q_of_a_trajectory_is_the_same_under_both_guides():
    # The seed's identity: q(x_1|x_0) prod q(x_t|x_{t-1}) = q(x_T|x_0) prod q(x_{t-1}|x_t,x_0).
    chain = small_chain(dtype=torch.float64)
    x0 = two_d_data(dtype=torch.float64)
    for guide, other in ((chain.guide_forward, chain.guide_posterior), (chain.guide_posterior, chain.guide_forward)):
        trace = poutine.trace(guide).get_trace(x0)
        replayed = poutine.trace(poutine.replay(other, trace)).get_trace(x0)
        log_q, log_q_other = trace.log_prob_sum(), replayed.log_prob_sum()
        assert abs(log_q - log_q_other) < 1e-10 * abs(log_q)
        log_p = poutine.trace(poutine.replay(chain.model, trace)).get_trace(x0).log_prob_sum()
        assert abs((log_p - log_q) - (log_p - log_q_other)) < 1e-10 * abs(log_p)


def replicates(estimate, chain, n):
    """n independent draws of (loss, gradient of the loss along a fixed random direction)."""
    params = list(chain.parameters())
    g = torch.Generator().manual_seed(99)
    direction = [torch.randn(p.shape, generator=g) for p in params]
    out = []
    for _ in range(n):
        for p in params:
            p.grad = None
        loss = estimate()
        out.append((loss, sum((p.grad * d).sum() for p, d in zip(params, direction)).item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("parameterization,variance", [("eps", "beta_tilde"), ("x0", "beta"), ("mean", "learned")])
def test_trace_elbo_full_bound_and_diffusion_elbo_agree_in_loss_and_gradient(parameterization, variance):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    chain, x0 = small_chain(parameterization, variance), two_d_data()
    P, M = 64, 40  # particles per replicate, replicates

    def stock(guide):
        elbo = Trace_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
        return lambda: elbo.loss_and_grads(chain.model, guide, x0)

    def full_bound():
        loss = chain.full_bound(x0.repeat(P, 1), chunk_size=3 * len(x0))["total"].sum() / P
        loss.backward()
        return loss.item()

    def subsampled(time_sampler):
        elbo = DiffusionELBO(num_particles=P, time_sampler=time_sampler)
        if time_sampler == "importance":  # fill the per-t history so p(t) is no longer uniform
            for _ in range(3):
                elbo.loss_and_grads(chain.model, chain.guide_posterior, x0)
            assert not torch.allclose(elbo.time_sampler.probs(4, "cpu"), torch.full((4,), 0.25, dtype=torch.float64))
        return lambda: elbo.loss_and_grads(chain.model, chain.guide_posterior, x0)

    estimators = {
        "Trace_ELBO, guide_forward": stock(chain.guide_forward),
        "Trace_ELBO, guide_posterior": stock(chain.guide_posterior),
        "full bound": full_bound,
        "DiffusionELBO": subsampled("uniform"),
        "DiffusionELBO, importance-sampled t": subsampled("importance"),
    }
    stats = {}
    for name, estimate in estimators.items():
        r = replicates(estimate, chain, M)
        stats[name] = (r.mean(0), r.std(0) / math.sqrt(M))
    ref_mean, ref_se = stats["full bound"]
    for name, (mean, se) in stats.items():
        # 4.5 standard errors: all 8 comparisons pass together with probability > 0.9999
        tol = 4.5 * torch.sqrt(se**2 + ref_se**2)
        assert ((mean - ref_mean).abs() < tol).all(), f"{name}: {mean} vs full bound {ref_mean} (tol {tol})"
    # the comparison has power: standard errors are small against the values compared
    assert (ref_se < 0.05 * ref_mean.abs()).all()


def test_trace_mean_field_elbo_with_guide_posterior_is_the_seeds_kl_form():
    chain = small_chain(dtype=torch.float64)
    x0 = two_d_data(dtype=torch.float64)
    pyro.set_rng_seed(5)
    loss = TraceMeanField_ELBO().loss(chain.model, chain.guide_posterior, x0)
    pyro.set_rng_seed(5)
    trace = poutine.trace(chain.guide_posterior).get_trace(x0)
    # L_T + sum_{t>=2} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) - log p(x_0|x_1), on the same draw of x_t
    kl_form = chain.prior_kl(x0).sum()
    for t in range(1, chain.T + 1):
        kl_form = kl_form + chain.vb_terms(x0, trace.nodes[f"x_{t}"]["value"], t).sum()
    assert loss == pytest.approx(kl_form.item(), rel=1e-12)
    # the same site-wise KLs with the forward factorisation are not mean-field, and Pyro says so
    with pytest.warns(UserWarning, match="mean field"):
        TraceMeanField_ELBO().loss(chain.model, chain.guide_forward, x0)


def train_chain(chain, x, steps, lr, batch_size, objective="elbo"):
    pyro.clear_param_store()
    objective = make_objective(objective)
    svi = SVI(
        chain.model,
        chain.guide_posterior,
        Adam({"lr": lr}),
        loss=objective.loss,
        loss_and_grads=objective.loss_and_grads,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        svi.step(x[torch.randint(0, len(x), (batch_size,), generator=g)])


def test_training_on_moons_lowers_the_bound_and_samples_match_mean_and_covariance():
    pyro.set_rng_seed(0)
    ds = datasets.load_moons(4000, 1000)
    # sigma_t^2 = beta_t: with a Gaussian decoder on continuous data, beta_tilde's
    # tiny sigma_1^2 makes the bound far harder to fit in a short run
    chain = DiffusionChain(
        TimeMLP(2, (128, 128, 128)), NoiseSchedule.from_name("linear", 50), 2, "gaussian", variance="beta"
    )
    with torch.no_grad():
        before = chain.full_bound(ds.x_test)["total"].mean().item()
    train_chain(chain, ds.x_train, steps=1500, lr=2e-3, batch_size=256)
    with torch.no_grad():
        after = chain.full_bound(ds.x_test)["total"].mean().item()
    assert after < before - 1.0, (before, after)
    data_mean, data_cov = ds.x_test.mean(0), torch.cov(ds.x_test.T)
    for steps in (None, 25):  # ancestral over all 50 steps, and respaced to 25
        s = chain.sample(4000, steps=steps)
        assert torch.isfinite(s).all()
        # MC standard error of a sample mean/covariance entry from 4000 draws is ~0.02
        # (the data are standardised: mean 0, variances 1); the tolerances allow
        # for the model's error after a short run, several times the MC error
        assert (s.mean(0) - data_mean).abs().max() < 0.1, (steps, s.mean(0), data_mean)
        assert (torch.cov(s.T) - data_cov).abs().max() < 0.15, (steps, torch.cov(s.T), data_cov)


def test_bits_per_dim_is_finite_untrained_and_decreases_on_digits():
    from pyrovae.recipes.diffusion import to_chain_space

    pyro.set_rng_seed(0)
    ds = datasets.load_digits()
    x_train, x_test = to_chain_space(ds.x_train), to_chain_space(ds.x_test[:50])
    chain = DiffusionChain(
        UNet((1, 8, 8), channels=16, channel_mult=(1, 2)), NoiseSchedule.from_name("linear", 100), 64, "discretised"
    )
    with torch.no_grad():
        before = chain.full_bound(x_test)
    assert torch.isfinite(before["bits_per_dim"]).all()
    train_chain(chain, x_train, steps=150, lr=2e-3, batch_size=64)
    with torch.no_grad():
        after = chain.full_bound(x_test)
    assert torch.isfinite(after["terms"]).all()
    assert after["bits_per_dim"].mean() < before["bits_per_dim"].mean() - 0.5, (
        before["bits_per_dim"].mean(),
        after["bits_per_dim"].mean(),
    )


def test_full_bound_terms_have_the_documented_shapes_and_units():
    chain, x0 = small_chain(), two_d_data(5)
    out = chain.full_bound(x0, chunk_size=1)
    assert out["terms"].shape == (5, 4) and out["prior"].shape == (5,)
    torch.testing.assert_close(out["total"], out["prior"] + out["terms"].sum(-1))
    torch.testing.assert_close(out["bits_per_dim"], out["total"] / (2 * math.log(2)))
    # L_T has no parameters: the closed form KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1))
    ab = torch.tensor(BETAS).neg().add(1).prod()
    expected = 0.5 * (ab * x0**2 + (1 - ab) - 1 - torch.log(1 - ab)).sum(-1)
    torch.testing.assert_close(out["prior"], expected)


def test_respaced_chain_shares_the_network_and_keeps_the_original_times():
    torch.manual_seed(0)
    chain = DiffusionChain(TimeMLP(2, (8,)), NoiseSchedule.from_name("linear", 100), 2)
    short = chain.respaced(5)
    assert short.T == 5 and short.net is chain.net
    assert short.schedule.timesteps.tolist() == [1, 26, 51, 75, 100]
    assert chain.sample(3, steps=5).shape == (3, 2)
    with pytest.raises(ValueError, match="steps"):
        chain.respaced(0)


def test_bad_arguments_are_clear_errors():
    s = NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError, match="parameterization"):
        DiffusionChain(TimeMLP(2), s, 2, parameterization="v")
    with pytest.raises(ValueError, match="out_mult=2"):
        DiffusionChain(TimeMLP(2), s, 2, variance="learned")
    chain = DiffusionChain(TimeMLP(4), s, 4, decoder="discretised")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        chain.model(torch.full((2, 4), 3.0))
    with pytest.raises(ValueError, match=r"shape \(batch >= 1, 4\)"):
        chain.full_bound(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="chain.model"):
        DiffusionELBO().loss(lambda x: None, chain.guide_posterior, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="hybrid"):
        HybridLoss().loss(chain.model, chain.guide_posterior, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="objective"):
        make_objective("mse")
    with pytest.raises(ValueError, match="importance"):
        make_objective("simple", time_sampler="importance")
    with pytest.raises(ValueError, match="num_particles"):
        DiffusionELBO(num_particles=0)


def test_cli_trains_samples_and_evaluates_a_diffusion_run(tmp_path):
    from pyrovae.cli import main

    run = tmp_path / "run"
    argv = [
        "train",
        "diffusion",
        "--data",
        "digits",
        "--T",
        "10",
        "--channels",
        "8",
        "--train-size",
        "64",
        "--test-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--sample-steps",
        "4",
        "--quiet",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    for name in ("config.json", "metrics.csv", "model.pt", "loss.png", "samples.png", "terms.png"):
        assert (run / name).exists(), name
    assert main(["sample", "diffusion", str(run), "--steps", "3", "--n", "4"]) == 0
    assert (run / "samples-0.png").exists() and (run / "samples-0.npy").exists()
    assert main(["evaluate", "diffusion", str(run), "--n", "4"]) == 0
    import json

    result = json.loads((run / "evaluate-10.json").read_text())
    # the bound's vocabulary, and the per-t KLs L_1..L_9 of t = 2..10
    assert result["n"] == 4 and len(result["test_kl_t"]) == 9
    assert result["test_kl_layers"] == pytest.approx(sum(result["test_kl_t"]))
    assert result["test_elbo"] == pytest.approx(result["test_recon"] - result["test_kl_top"] - result["test_kl_layers"])
    # bits/dim is -ELBO over D ln 2 (D = 64 pixels)
    assert result["test_bpd"] == pytest.approx(-result["test_elbo"] / (64 * math.log(2)))
    # the image run trains the hybrid loss: its column says so, bounds keep *_elbo
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train_loss_hybrid" in header and "train_elbo" not in header
    assert {"test_recon", "test_kl_top", "test_kl_layers", "test_elbo", "test_bpd"} <= set(header)
    assert main(["evaluate", "diffusion", str(tmp_path / "missing")]) == 1


def test_cli_rejects_settings_that_cannot_train(tmp_path, capsys):
    from pyrovae.cli import main

    base = ["train", "diffusion", "--data", "moons", "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert main(base + ["--objective", "hybrid"]) == 1
    assert "variance 'learned'" in capsys.readouterr().err
    assert main(base + ["--net", "unet"]) == 1
    assert "image data" in capsys.readouterr().err


@pytest.mark.parametrize("T", [1, 3])
def test_model_and_guides_have_one_site_per_step_named_after_the_variable(T):
    chain = DiffusionChain(TimeMLP(2, (8,)), NoiseSchedule.from_name("cosine", T), 2)
    x0 = two_d_data(3)

    def trace(fn):
        return poutine.trace(fn).get_trace(x0)

    def names(fn):
        return [
            n for n, site in trace(fn).nodes.items() if site["type"] == "sample" and n != "data"
        ]  # "data": the plate

    assert names(chain.model) == [f"x_{t}" for t in range(T, -1, -1)]
    assert names(chain.guide_posterior) == [f"x_{t}" for t in range(T, 0, -1)]
    assert names(chain.guide_forward) == [f"x_{t}" for t in range(1, T + 1)]
    assert chain.full_bound(x0)["terms"].shape == (3, T)


def test_hybrid_loss_adds_lambda_times_the_bound_term_in_bits_per_dim():
    # improved-diffusion's units (RESCALED_MSE): L_hybrid = L_simple + lambda L_vlb
    # with L_vlb in bits per dimension, so a published lambda means the same here
    chain, x0 = small_chain(variance="learned", dtype=torch.float64), two_d_data(dtype=torch.float64)
    lam, values = 0.25, {}
    for name, objective in (
        ("simple", SimpleLoss(2)),
        ("hybrid", HybridLoss(2, hybrid_weight=lam)),
        ("elbo", DiffusionELBO(2)),
    ):
        pyro.set_rng_seed(3)  # the same t and x_t for all three
        values[name] = objective.loss(chain.model, chain.guide_posterior, x0)
    vlb_nats = values["elbo"] - chain.prior_kl(x0).sum().item()  # the estimate of sum_t L_{t-1}, summed over the batch
    assert values["hybrid"] - values["simple"] == pytest.approx(lam * vlb_nats / (chain.x_dim * math.log(2)), rel=1e-10)


def test_objectives_name_their_training_column():
    assert DiffusionELBO().train_metric == "train_elbo"
    assert SimpleLoss().train_metric == "train_loss_simple" and HybridLoss().train_metric == "train_loss_hybrid"
    assert not isinstance(SimpleLoss(), pyro.infer.ELBO)  # a loss, not a bound


def test_importance_time_sampler_state_round_trips_and_continues_the_same_draws():
    chain, x0 = small_chain(), two_d_data()
    elbo = DiffusionELBO(num_particles=8, time_sampler="importance")
    assert elbo.time_sampler.state_dict() == {"squares": None, "count": None}
    for _ in range(3):
        elbo.loss_and_grads(chain.model, chain.guide_posterior, x0)
    state = elbo.time_sampler.state_dict()
    resumed = DiffusionELBO(num_particles=8, time_sampler="importance")
    resumed.time_sampler.load_state_dict(state)
    p = elbo.time_sampler.probs(chain.T, "cpu")
    assert torch.equal(resumed.time_sampler.probs(chain.T, "cpu"), p)
    assert not torch.allclose(p, torch.full_like(p, 1 / chain.T))  # not the uniform restart
    for objective in (elbo, resumed):
        pyro.set_rng_seed(4)
        objective.loss_and_grads(chain.model, chain.guide_posterior, x0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(elbo.time_sampler.state_dict().values(), resumed.time_sampler.state_dict().values())
    )
    with pytest.raises(ValueError, match="squares"):
        resumed.time_sampler.load_state_dict({})


class OracleDenoiser(torch.nn.Module):
    """The exact eps prediction for data that are the point c: eps = (x_t -
    sqrt(alpha_bar_t) c) / sqrt(1 - alpha_bar_t), reading t off the network's
    time scale 0..1000 of the *original* chain."""

    def __init__(self, schedule, c):
        super().__init__()
        self.schedule, self.c, self.out_mult = schedule, c, 1
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, tau):
        t = (tau * self.schedule.T / 1000).round().long()
        ab = self.schedule.alphas_cumprod[t - 1].to(x.dtype)[:, None]
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt()


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_respaced_chain_ends_at_T_tells_the_network_original_times_and_samples_exactly(steps):
    schedule = NoiseSchedule.from_name("linear", 50)
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    chain = DiffusionChain(OracleDenoiser(schedule, c), schedule, 2).to(torch.float64)
    short = chain.respaced(steps)
    assert short.schedule.timesteps[-1] == 50 and short.T == steps
    # q(x_{tau_k}|x_0) is the original's at every kept time, the last included
    torch.testing.assert_close(short.schedule.alphas_cumprod, schedule.alphas_cumprod[short.schedule.timesteps - 1])
    # x0_hat = c at the first step: the network was told the original time T
    x = torch.randn(5, 2, dtype=torch.float64)
    out = short.p_mean_variance(x, steps)
    torch.testing.assert_close(out["x0_hat"], c.expand(5, 2))
    # one step (sample --steps 1): x_T ~ N(0, I), then the decoder's mean is c exactly
    torch.testing.assert_close(chain.sample(5, steps=steps, clip_x0=False), c.expand(5, 2))


@pytest.mark.parametrize("schedule,T,steps", [("linear", 10, None), ("cosine", 1000, None), ("linear", 1000, 50)])
def test_prior_kl_is_the_gaussian_kl_of_q_x_T_given_x0_from_n_0_1(schedule, T, steps):
    """L_T = KL(N(sqrt(a) x_0, (1 - a) I) || N(0, I)), a = alpha_bar_T, against
    torch's Normal KL summed over the pixels (also for a respaced chain)."""
    from torch.distributions import kl_divergence

    chain = DiffusionChain(TimeMLP(4, (8,)), NoiseSchedule.from_name(schedule, T), 4).double()
    chain = chain if steps is None else chain.respaced(steps)
    x0 = torch.rand(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = chain.schedule.alphas_cumprod[-1]
    q = dist.Normal(a.sqrt() * x0, (1 - a).sqrt())
    expected = kl_divergence(q, dist.Normal(torch.zeros_like(x0), torch.ones_like(x0))).sum(-1)
    torch.testing.assert_close(chain.prior_kl(x0), expected, rtol=1e-10, atol=1e-12)
