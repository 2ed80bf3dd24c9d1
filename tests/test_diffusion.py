import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyrovae import data as datasets
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.distributions import DiscretisedGaussian, quantise
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.diffusion_elbo import DiffusionELBO

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
            assert not torch.allclose(elbo.time_probs(4, "cpu"), torch.full((4,), 0.25, dtype=torch.float64))
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


def test_discretised_gaussian_is_a_pmf_over_the_256_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for loc, scale in ((0.3, 0.01), (0.999, 1e-3), (-3.0, 0.5), (0.0, 5.0), (0.5, 1e-6)):
        d = DiscretisedGaussian(torch.full((256,), loc, dtype=torch.float64), torch.full((256,), scale, dtype=torch.float64))
        assert d.log_prob(bins).exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    d = DiscretisedGaussian(torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    x = quantise(torch.tensor(0.25, dtype=torch.float64))
    normal = torch.distributions.Normal(torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    mass = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    assert d.log_prob(x).item() == pytest.approx(mass.log().item(), rel=1e-10)
    assert set(quantise(d.sample((1000,))).tolist()) <= set(bins.tolist())


def train_chain(chain, x, steps, lr, batch_size, objective="elbo"):
    pyro.clear_param_store()
    svi = SVI(chain.model, chain.guide_posterior, Adam({"lr": lr}), DiffusionELBO(objective=objective))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        svi.step(x[torch.randint(0, len(x), (batch_size,), generator=g)])


def test_training_on_moons_lowers_the_bound_and_samples_match_mean_and_covariance():
    pyro.set_rng_seed(0)
    ds = datasets.load_moons(4000, 1000)
    # sigma_t^2 = beta_t: with a Gaussian decoder on continuous data, beta_tilde's
    # tiny sigma_1^2 makes the bound far harder to fit in a short run
    chain = DiffusionChain(TimeMLP(2, (128, 128, 128)), NoiseSchedule.from_name("linear", 50), 2, "gaussian", variance="beta")
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
    chain = DiffusionChain(UNet((1, 8, 8), channels=16, channel_mult=(1, 2)), NoiseSchedule.from_name("linear", 100), 64, "discretised")
    with torch.no_grad():
        before = chain.full_bound(x_test)
    assert torch.isfinite(before["bits_per_dim"]).all()
    train_chain(chain, x_train, steps=150, lr=2e-3, batch_size=64)
    with torch.no_grad():
        after = chain.full_bound(x_test)
    assert torch.isfinite(after["terms"]).all()
    assert after["bits_per_dim"].mean() < before["bits_per_dim"].mean() - 0.5, (before["bits_per_dim"].mean(), after["bits_per_dim"].mean())


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
        DiffusionELBO(objective="hybrid").loss(chain.model, chain.guide_posterior, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="objective"):
        DiffusionELBO(objective="mse")


def test_cli_trains_samples_and_evaluates_a_diffusion_run(tmp_path):
    from pyrovae.cli import main

    run = tmp_path / "run"
    argv = ["train", "diffusion", "--data", "digits", "--T", "10", "--channels", "8", "--train-size", "64", "--test-size", "16", "--epochs", "1", "--batch-size", "32", "--sample-steps", "4", "--quiet", "--out", str(run)]
    assert main(argv) == 0
    for name in ("config.json", "metrics.csv", "model.pt", "loss.png", "samples.png", "terms.png"):
        assert (run / name).exists(), name
    assert main(["sample", "diffusion", str(run), "--steps", "3", "--n", "4"]) == 0
    assert (run / "samples-3.png").exists()
    assert main(["evaluate", "diffusion", str(run), "--n", "4"]) == 0
    import json

    result = json.loads((run / "evaluate-10.json").read_text())
    assert result["n"] == 4 and len(result["terms_nats"]) == 10
    # the file's bits/dim is its nats over D ln 2 (D = 64 pixels)
    assert result["bits_per_dim"] == pytest.approx(result["nats"] / (64 * math.log(2)))
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
    trace = lambda fn: poutine.trace(fn).get_trace(x0)
    names = lambda fn: [n for n, site in trace(fn).nodes.items() if site["type"] == "sample" and n != "data"]  # "data": the plate
    assert names(chain.model) == [f"x_{t}" for t in range(T, -1, -1)]
    assert names(chain.guide_posterior) == [f"x_{t}" for t in range(T, 0, -1)]
    assert names(chain.guide_forward) == [f"x_{t}" for t in range(1, T + 1)]
    assert chain.full_bound(x0)["terms"].shape == (3, T)
