"""The hierarchical VAE: L = 1 is the VAE, and the analytic-KL ELBO on both
encoders equals Trace_ELBO in expectation (tolerances from the Monte Carlo
standard error, as in test_analytic_elbo.py)."""

import warnings

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from test_analytic_elbo import assert_means_equal

from pyrovae.hvae import HVAE, active_units, bound_terms, build_hvae
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.parts.priors import VampPrior
from pyrovae.vae import VAE, build_vae


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


def binary_data(n=6, d=10, seed=4):
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(seed))


def small_hvae(encoder, z_dims=(4, 3), seed=3):
    torch.manual_seed(seed)
    return build_hvae(10, z_dims, hidden=(8,), encoder=encoder)


def loss_and_projection_draws(elbo_class, net, x, n: int, particles: int = 20, seed: int = 6) -> torch.Tensor:
    """n independent (loss, 4 random projections of the gradient) estimates."""
    elbo = elbo_class(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    params = list(net.parameters())
    directions = torch.randn(
        sum(p.numel() for p in params), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    rows = []
    for _ in range(n):
        loss = elbo.differentiable_loss(net.model, net.guide, x)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()
        rows.append(torch.cat([loss.detach().double().reshape(1), grad @ directions]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------
# L = 1 is the VAE.


def test_one_layer_hvae_has_the_vaes_parameters_and_equals_it_on_the_same_draws():
    torch.manual_seed(0)
    vae = build_vae(10, 3, (8,))
    torch.manual_seed(1)  # other initial weights: the VAE's are loaded below
    hvae = build_hvae(10, (3,), (8,))
    assert list(hvae.state_dict()) == list(vae.state_dict())
    hvae.load_state_dict(vae.state_dict())
    x = binary_data()
    for elbo in (TraceAnalyticKL_ELBO(num_particles=3), Trace_ELBO(num_particles=3)):
        pyro.set_rng_seed(7)
        vae_loss = elbo.loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(7)
        assert elbo.loss(hvae.model, hvae.guide, x) == pytest.approx(vae_loss, rel=1e-6)
    pyro.set_rng_seed(8)
    vae_terms = vae.bound(x, num_particles=2).summary()
    pyro.set_rng_seed(8)
    assert hvae.bound(x, num_particles=2).summary() == pytest.approx(vae_terms, rel=1e-6)
    torch.manual_seed(9)
    samples = vae.sample(5)
    torch.manual_seed(9)
    torch.testing.assert_close(hvae.sample(5), samples)
    torch.testing.assert_close(hvae.reconstruct(x), vae.reconstruct(x))


def test_one_layer_build_hvae_draws_build_vaes_initial_weights():
    torch.manual_seed(2)
    vae = build_vae(10, 3, (8,))
    torch.manual_seed(2)
    hvae = build_hvae(10, (3,), (8,))
    for (name, a), b in zip(vae.state_dict().items(), hvae.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_vae_is_the_one_layer_hvae_with_the_vaes_site_name():
    vae, hvae = build_vae(10, 3, (8,)), build_hvae(10, (3,), (8,))
    assert type(vae) is type(hvae) is HVAE
    assert vae.sites == hvae.sites == ("z",) and small_hvae("top-down").sites == ("z_1", "z_2")
    # VAE, for code that builds one from its parts, adds a constructor and nothing else
    assert issubclass(VAE, HVAE) and [name for name in vars(VAE) if not name.startswith("__")] == []
    assert VAE(vae.encoder, vae.decoder, 10, 3).sites == ("z",)


def test_bound_is_per_example_and_sums_to_the_analytic_elbos_terms():
    hvae, x = small_hvae("top-down", z_dims=(4, 3)), binary_data()
    pyro.set_rng_seed(5)
    bound = hvae.bound(x, num_particles=3)
    pyro.set_rng_seed(5)
    elbo = TraceAnalyticKL_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    terms = elbo.terms(hvae.model, hvae.guide, x)
    assert bound.recon.shape == bound.kl_top.shape == bound.kl_layers.shape == (len(x),)
    assert list(bound.layers) == ["kl_1", "kl_2"] and bound.closed_form == (1, 2)
    assert bound.recon.sum().item() == pytest.approx(terms["x"], rel=1e-5)
    assert -bound.layers["kl_1"].sum().item() == pytest.approx(terms["z_1"], rel=1e-5)
    assert -bound.layers["kl_2"].sum().item() == pytest.approx(terms["z_2"], rel=1e-5)
    assert torch.equal(bound.kl_top, bound.layers["kl_2"]) and torch.equal(bound.kl_layers, bound.layers["kl_1"])


def test_bound_terms_is_the_bounds_summary_with_its_closed_form_layers():
    hvae, x = small_hvae("top-down", z_dims=(4, 3)), binary_data()
    pyro.set_rng_seed(5)
    bound = hvae.bound(x, num_particles=2)
    pyro.set_rng_seed(5)
    assert bound_terms(hvae, x, num_particles=2) == {**bound.summary(), "closed_form": [1, 2]}


def test_a_one_layer_bound_has_no_layers_below_the_top():
    bound = build_vae(10, 3, (8,)).bound(binary_data(n=7), num_particles=2, batch_size=4)
    assert len(bound) == 7 and list(bound.layers) == ["kl_1"] and bound.closed_form == (1,)
    assert torch.equal(bound.kl_layers, torch.zeros(7)) and torch.equal(bound.kl_top, bound.layers["kl_1"])
    assert list(bound.summary()) == ["recon", "kl_top", "elbo", "bpd", "kl_1"]


# ---------------------------------------------------------------------------
# Top-down: every KL exact. Bottom-up: Monte Carlo below the top.


def test_top_down_takes_every_kl_in_closed_form_and_matches_trace_elbo_in_expectation():
    hvae, x = small_hvae("top-down", z_dims=(4, 3, 2)), binary_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        terms = TraceAnalyticKL_ELBO().terms(hvae.model, hvae.guide, x)
        analytic = loss_and_projection_draws(TraceAnalyticKL_ELBO, hvae, x, 100)
    assert set(terms.closed_form) == {"z_1", "z_2", "z_3"}
    trace = loss_and_projection_draws(Trace_ELBO, hvae, x, 100)
    assert_means_equal(analytic, trace, comparisons=5)


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
def test_bottom_up_warns_takes_monte_carlo_below_the_top_and_matches_trace_elbo(validate):
    """q(z_1|x) q(z_2|z_1) q(z_3|z_2): the model's parent z_{l+1} of z_l is drawn
    after z_l and from it, so only z_3 keeps the closed form."""
    hvae, x = small_hvae("bottom-up", z_dims=(4, 3, 2)), binary_data()
    with pyro.validation_enabled(validate):
        elbo = TraceAnalyticKL_ELBO()
        with pytest.warns(UserWarning, match=r"biased at sites \['z_1', 'z_2'\]"):
            assert elbo.terms(hvae.model, hvae.guide, x).closed_form == ("z_3",)
        analytic = loss_and_projection_draws(TraceAnalyticKL_ELBO, hvae, x, 100)
        trace = loss_and_projection_draws(Trace_ELBO, hvae, x, 100)
    assert_means_equal(analytic, trace, comparisons=5)


def test_one_layer_hvae_is_closed_form_with_either_encoder():
    x = binary_data()
    for encoder in ("top-down", "bottom-up"):
        hvae = small_hvae(encoder, z_dims=(3,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert hvae.bound(x).closed_form == (1,)


# ---------------------------------------------------------------------------
# Named terms, active units, priors, errors.


def test_named_terms_per_example_add_up_to_the_elbo():
    hvae, x = small_hvae("top-down", z_dims=(4, 3, 2)), binary_data()
    terms = hvae.bound(x, num_particles=4).summary()
    assert terms["kl_top"] == terms["kl_3"]
    assert terms["kl_layers"] == pytest.approx(terms["kl_1"] + terms["kl_2"])
    assert terms["elbo"] == pytest.approx(terms["recon"] - terms["kl_top"] - terms["kl_layers"])
    assert all(terms[f"kl_{l}"] > 0 for l in (1, 2, 3)) and terms["recon"] < 0
    pyro.set_rng_seed(11)
    loss = TraceAnalyticKL_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(
        hvae.model, hvae.guide, x
    )
    pyro.set_rng_seed(11)
    assert hvae.bound(x, num_particles=4).summary()["elbo"] == pytest.approx(-loss / len(x), rel=1e-5)


def test_active_units_count_the_units_whose_posterior_mean_varies_with_x():
    hvae, x = small_hvae("top-down", z_dims=(4,)), binary_data(n=50)
    head = hvae.encoder.net[-1]
    with torch.no_grad():
        head.weight[:4] = 0.0  # every mean a constant: no active unit
    assert active_units(hvae, x) == {1: 0}
    with torch.no_grad():
        head.weight[:2] = 3.0 * torch.randn(2, head.weight.shape[1])  # two means vary strongly with x
    assert active_units(hvae, x) == {1: 2}


def test_vamp_prior_works_with_the_top_down_encoder_and_is_refused_bottom_up():
    hvae = build_hvae(10, (4, 3), (8,), encoder="top-down", prior="vamp")
    assert isinstance(hvae.prior, VampPrior)
    # q(z_L | x) at the pseudo-inputs: the prior follows the top-down pass, its parameters registered once
    assert sum(1 for name, _ in hvae.named_parameters() if name.startswith("encoder.")) == 4
    assert torch.isfinite(hvae.bound(binary_data()).elbo()).all()
    with pytest.raises(ValueError, match="vamp.*bottom-up.*integral over"):
        build_hvae(10, (4, 3), (8,), encoder="bottom-up", prior="vamp")


@pytest.mark.parametrize("prior", ["mog", "flow"])
def test_other_priors_sit_at_the_top(prior):
    hvae = build_hvae(10, (4, 3), (8,), encoder="top-down", prior=prior)
    x = binary_data()
    assert hvae.prior().event_shape == (3,)
    assert hvae.bound(x).closed_form == (1,)  # no registered KL against these priors at z_2


def test_samples_and_reconstructions_have_the_data_shape():
    hvae = small_hvae("bottom-up", z_dims=(4, 3, 2))
    x = binary_data()
    assert hvae.sample(7).shape == (7, 10)
    assert hvae.reconstruct(x).shape == x.shape
    assert [z.shape for z in hvae.encode_layers(x)] == [(6, 4), (6, 3), (6, 2)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"z_dims": ()}, "z_dims must name at least one layer"),
        ({"z_dims": (4, 0)}, r"z_dims\[1\] must be an integer >= 1"),
        ({"hidden": (8, 8, 8)}, "one entry per layer"),
        ({"hidden": (8, 0)}, "hidden widths must be >= 1"),
        ({"encoder": "sideways"}, "unknown encoder 'sideways'"),
        ({"prior": "uniform"}, "unknown prior 'uniform'"),
        ({"likelihood": "poisson"}, "unknown likelihood 'poisson'"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_hvae(10, **{"z_dims": (4, 3), **kwargs})


def test_wrong_data_shape_is_a_clear_error():
    hvae = small_hvae("top-down")
    with pytest.raises(ValueError, match=r"x must have shape \(batch >= 1, 10\)"):
        TraceAnalyticKL_ELBO().loss(hvae.model, hvae.guide, torch.zeros(3, 9))


def test_hvae_constructor_checks_its_networks():
    with pytest.raises(ValueError, match="2 layers need 1 up and step networks"):
        HVAE(torch.nn.Identity(), [], [], torch.nn.Identity(), 10, (4, 3))


# ---------------------------------------------------------------------------
# pyrovae train | evaluate | sample hvae.


def test_the_default_kl_warmup_is_50_epochs_and_a_trace_elbo_is_told_to_switch_it_off(tmp_path, capsys):
    """The HVAE's default recipe warms up (docs/hvae.md: +1.35 nats IWAE-1000 on
    MNIST-5k over no warm-up); the Monte Carlo ELBO has no KL weight, so asking
    for it fails before training and names the flag that makes it work."""
    from pyrovae.cli import main
    from pyrovae.config import HVAEConfig, TrainConfig

    assert HVAEConfig().kl_warmup == 50 and TrainConfig(model="vae").kl_warmup == 0
    tiny = [
        "--data",
        "digits",
        "--train-size",
        "16",
        "--test-size",
        "8",
        "--epochs",
        "1",
        "--z-dims",
        "3",
        "2",
        "--hidden",
        "4",
        "--quiet",
    ]
    assert main(["train", "hvae", *tiny, "--elbo", "trace", "--out", str(tmp_path / "a")]) == 1
    assert "add --kl-warmup 0" in capsys.readouterr().err
    assert main(["train", "hvae", *tiny, "--elbo", "trace", "--kl-warmup", "0", "--out", str(tmp_path / "b")]) == 0
    assert "warning: --kl-warmup" not in capsys.readouterr().err


def test_cli_trains_evaluates_and_samples_an_hvae_with_the_vaes_report_and_each_layers(tmp_path, capsys):
    import json

    from pyrovae.cli import main

    out = tmp_path / "run"
    tiny = [
        "--data",
        "digits",
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--epochs",
        "2",
        "--z-dims",
        "4",
        "2",
        "--hidden",
        "8",
        "--depth",
        "1",
        "--test-particles",
        "2",
        "--quiet",
    ]
    assert main(["train", "hvae", *tiny, "--kl-warmup", "1", "--iwae-k", "3", "--out", str(out)]) == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {
        "test_elbo",
        "test_recon",
        "test_bpd",
        "test_kl_1",
        "test_kl_2",
        "test_kl_top",
        "test_kl_layers",
        "test_active_1",
        "test_active_2",
        "test_iwae",
    } <= set(header)
    capsys.readouterr()
    assert main(["evaluate", "hvae", str(out), "--iwae-k", "3"]) == 0
    hvae_report = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "train",
                "vae",
                *tiny[:8],
                "--z-dim",
                "2",
                "--hidden",
                "8",
                "--quiet",
                "--iwae-k",
                "3",
                "--out",
                str(tmp_path / "vae"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "vae", str(tmp_path / "vae")]) == 0
    vae_report = json.loads(capsys.readouterr().out)
    assert set(vae_report) <= set(hvae_report)
    assert hvae_report["test_elbo"] == pytest.approx(
        hvae_report["test_recon"] - hvae_report["test_kl_top"] - hvae_report["test_kl_layers"]
    )
    assert main(["sample", "hvae", str(out), "--n", "5"]) == 0
    assert (out / "samples-0.npy").exists()


def test_cli_refuses_the_vamp_prior_with_the_bottom_up_encoder(tmp_path, capsys):
    from pyrovae.cli import main

    assert (
        main(
            [
                "train",
                "hvae",
                "--data",
                "digits",
                "--encoder",
                "bottom-up",
                "--prior",
                "vamp",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    assert "needs q(z_L | x)" in capsys.readouterr().err


@pytest.fixture
def kl_weights_seen(monkeypatch):
    """The KL weight the HVAE recipe sets at the start of each epoch, in order."""
    from pyrovae.recipes.hvae import HVAERecipe

    seen = []
    original = HVAERecipe.on_epoch_start

    def record(self, cfg, epoch, objective):
        original(self, cfg, epoch, objective)
        seen.append(objective.kl_scale)

    monkeypatch.setattr(HVAERecipe, "on_epoch_start", record)
    return seen


def test_kl_warmup_raises_the_hvaes_kl_weight_linearly(kl_weights_seen, tmp_path):
    from pyrovae import train as training
    from pyrovae.config import TrainConfig

    cfg = TrainConfig(
        model="hvae",
        data="digits",
        train_size=16,
        test_size=8,
        epochs=4,
        z_dims=[3, 2],
        hidden=[4],
        kl_warmup=2,
        test_particles=1,
        quiet=True,
        out=str(tmp_path),
    )
    training.train(cfg)
    assert kl_weights_seen == pytest.approx([0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("encoder", ["top-down", "bottom-up"])
def test_the_kl_weight_scales_every_layers_kl_of_the_hvae(encoder):
    # What --kl-warmup sets each epoch: the loss is -(recon + beta * (the latent terms of every layer)),
    # closed-form (top-down) or Monte Carlo (bottom-up's z_1), on the same draws.
    hvae, x = small_hvae(encoder), binary_data()
    elbo = TraceAnalyticKL_ELBO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for beta in (0.0, 0.3, 1.0):
            pyro.set_rng_seed(11)
            terms = elbo.terms(hvae.model, hvae.guide, x)
            elbo.kl_scale = beta
            pyro.set_rng_seed(11)
            loss = elbo.differentiable_loss(hvae.model, hvae.guide, x).item()
            elbo.kl_scale = 1.0
            assert set(terms) == {"x", "z_1", "z_2"}
            assert terms["z_1"] < 0 and terms["z_2"] < 0
            assert loss == pytest.approx(-(terms["x"] + beta * (terms["z_1"] + terms["z_2"])), rel=1e-5)


def test_cli_kl_warmup_ramps_the_hvaes_kl_weight(kl_weights_seen, tmp_path):
    from pyrovae.cli import main

    tiny = [
        "--data",
        "digits",
        "--train-size",
        "16",
        "--test-size",
        "8",
        "--z-dims",
        "3",
        "2",
        "--hidden",
        "4",
        "--test-particles",
        "1",
        "--quiet",
    ]
    assert (
        main(
            [
                "train",
                "hvae",
                *tiny,
                "--encoder",
                "top-down",
                "--epochs",
                "5",
                "--kl-warmup",
                "4",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    assert kl_weights_seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
