"""Conditioning inputs y (issue 25, items 1-2): CVAE/HVAE, the conditional chain
and VDM, and classifier-free guidance."""

import contextlib
import math
import re

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae.diffusion import samplers
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.gamma import make_gamma
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.diffusion.vdm import VDM
from pyrovae.hvae import build_hvae
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.infer.vdm_elbo import VDMELBO
from pyrovae.vae import build_vae

K, D = 3, 6


def binary(n=8, seed=0):
    return torch.bernoulli(torch.full((n, D), 0.5), generator=torch.Generator().manual_seed(seed))


def classes(n=8):
    return torch.arange(n) % K


def chain_twins(net=TimeMLP, **kw):
    """An unconditional chain and its conditional twin: the same initial weights but the y embedding."""
    torch.manual_seed(0)
    plain = DiffusionChain(net(D, (16, 16), **kw), NoiseSchedule.from_name("linear", 20), D)
    torch.manual_seed(0)
    cond = DiffusionChain(net(D, (16, 16), num_classes=K, **kw), NoiseSchedule.from_name("linear", 20), D)
    return plain, cond


@pytest.mark.parametrize("net", [TimeMLP, UNet])
def test_unconditional_denoiser_is_the_conditional_one_with_a_zero_embedding(net):
    make = (lambda **kw: TimeMLP(D, (16, 16), **kw)) if net is TimeMLP else (lambda **kw: UNet((1, 4, 4), 8, **kw))
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    cond = make(num_classes=K)
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label.proj.weight"}
    with torch.no_grad():  # the U-Net's zero-initialised layers would hide every input
        for p in plain.parameters():
            p.normal_(0, 0.3)
    cond.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(6, plain.x_dim), torch.rand(6) * 1000
    y = torch.arange(6) % K
    torch.nn.init.normal_(cond.label.proj.weight)
    assert not torch.allclose(cond(x, t, y), cond(x, t, (y + 1) % K))  # y reaches the prediction
    torch.nn.init.zeros_(cond.label.proj.weight)
    assert torch.equal(plain(x, t), cond(x, t, y))


def test_null_class_embeds_to_zero():
    torch.manual_seed(0)
    net = TimeMLP(D, (16,), num_classes=K)
    x, t = torch.randn(4, D), torch.rand(4) * 1000
    assert torch.equal(net(x, t, torch.full((4,), -1)), net(x, t))


def test_cvae_y_reaches_decoder_and_encoder():
    pyro.set_rng_seed(0)
    vae = build_vae(D, 2, (8,), num_classes=K)
    x, y = binary(), classes()
    z = torch.randn(8, 2)
    assert not torch.allclose(vae.decode(z, y), vae.decode(z, (y + 1) % K))
    assert not torch.allclose(vae.encode(x, y=y), vae.encode(x, y=(y + 1) % K))


def test_cvae_with_zero_y_columns_is_the_unconditional_vae():
    torch.manual_seed(0)
    plain = build_vae(D, 2, (8,))
    cvae = build_vae(D, 2, (8,), num_classes=K)
    with torch.no_grad():
        for name, p in cvae.named_parameters():
            q = dict(plain.named_parameters())[name]
            if p.shape == q.shape:
                p.copy_(q)
            else:  # the first layers: the x (or z) columns are the VAE's, the y columns zero
                p.zero_()
                p[:, : q.shape[1]] = q
    x, y = binary(), classes()
    z = torch.randn(8, 2)
    assert torch.equal(plain.decode(z), cvae.decode(z, y))
    assert torch.equal(plain.encode(x), cvae.encode(x, y=y))


def test_unconditional_hvae_has_no_new_parameters():
    torch.manual_seed(0)
    a = build_hvae(D, (3, 2), (8, 4))
    torch.manual_seed(0)
    b = build_hvae(D, (3, 2), (8, 4))
    assert a.conditioning is None and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("encoder", ["bottom-up", "top-down"])
def test_conditional_bound_equals_trace_elbo_in_expectation(encoder):
    pyro.set_rng_seed(0)
    hvae = build_hvae(D, (3, 2), (8, 4), encoder=encoder, num_classes=K)
    x, y = binary(4), classes(4)
    analytic = -TraceAnalyticKL_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1).loss(
        hvae.model, hvae.guide, x, y
    )
    draws = torch.tensor(
        [-Trace_ELBO(num_particles=1).loss(hvae.model, hvae.guide, x, y) for _ in range(500)], dtype=torch.float64
    )
    # 5 standard errors of the Trace_ELBO mean (the analytic estimate's own error is smaller)
    assert abs(draws.mean() - analytic) < 5 * draws.std() / len(draws) ** 0.5 + 1e-3
    bound = hvae.bound(x, 200, y=y)
    assert abs(bound.elbo().sum() - analytic) < 5 * draws.std() / 200**0.5


def test_chain_and_vdm_bounds_depend_on_y():
    _, chain = chain_twins()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    x0 = torch.rand(8, D) * 2 - 1
    y = classes()
    torch.manual_seed(0)
    vdm = VDM(TimeMLP(D, (16,), num_classes=K), make_gamma("fixed"), D)
    torch.nn.init.normal_(vdm.net.label.proj.weight)
    for elbo, model in ((DiffusionELBO(), chain), (VDMELBO(), vdm)):
        with torch.no_grad():
            pyro.set_rng_seed(1)
            a = elbo.differentiable_loss(model.model, model.guide, x0, y)
            pyro.set_rng_seed(1)
            b = elbo.differentiable_loss(model.model, model.guide, x0, (y + 1) % K)
        assert a != b, type(model).__name__


def test_conditional_chain_with_zero_embedding_has_the_unconditional_bound():
    plain, cond = chain_twins()
    torch.nn.init.zeros_(cond.net.label.proj.weight)
    x0 = torch.rand(8, D) * 2 - 1
    with torch.no_grad():
        pyro.set_rng_seed(1)
        a = DiffusionELBO().differentiable_loss(plain.model, plain.guide, x0)
        pyro.set_rng_seed(1)
        b = DiffusionELBO().differentiable_loss(cond.model, cond.guide, x0, classes())
    assert torch.equal(a, b)


def test_conditional_chain_bound_equals_trace_elbo_in_expectation():
    """The time-subsampled bound of log p(x_0 | y) against Trace_ELBO on the literal chain given y."""
    torch.manual_seed(0)
    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    chain = DiffusionChain(TimeMLP(2, (16,), num_classes=K), NoiseSchedule(betas), 2).double()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    x0, y = torch.rand(3, 2, dtype=torch.float64) * 2 - 1, torch.arange(3)
    pyro.set_rng_seed(0)
    trace = Trace_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        a = torch.tensor([trace.loss(chain.model, chain.guide, x0, y) for _ in range(10)])
        b = torch.tensor([DiffusionELBO(num_particles=1000).loss(chain.model, chain.guide, x0, y) for _ in range(10)])
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    assert abs(a.mean() - b.mean()) < 5 * se  # 5 standard errors of the difference of the two means


def test_literal_conditional_chain_traces_with_y():
    _, chain = chain_twins()
    x0 = torch.rand(4, D) * 2 - 1
    loss = Trace_ELBO().loss(chain.model, chain.guide, x0, classes(4))
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm-solver++"])
def test_guidance_zero_is_the_conditional_sampler(sampler):
    _, chain = chain_twins()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    y = classes(5)
    a = samplers.sample(chain, 5, 10, sampler, seed=3, y=y)
    b = samplers.sample(chain, 5, 10, sampler, seed=3, y=y, guidance=0.0)
    c = samplers.sample(chain, 5, 10, sampler, seed=3, y=y, guidance=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_is_the_weighted_difference():
    _, chain = chain_twins()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    from pyrovae.diffusion.denoisers import conditioned

    y, x, t = classes(4), torch.randn(4, D), torch.rand(4) * 1000
    guided = conditioned(chain, y, 3.0).net(x, t)
    expected = 4.0 * chain.net(x, t, y) - 3.0 * chain.net(x, t, torch.full_like(y, -1))
    assert torch.allclose(guided, expected)


def test_vdm_guidance_zero_is_the_conditional_sampler():
    torch.manual_seed(0)
    vdm = VDM(TimeMLP(D, (16,), num_classes=K), make_gamma("fixed"), D)
    y = classes(4)
    a = samplers.sample(vdm, 4, 8, "ddim", seed=0, y=y)
    b = samplers.sample(vdm, 4, 8, "ddim", seed=0, y=y, guidance=0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x: m.bound(x, 2, y=torch.full((8,), 12)), ValueError, r"classes in \[0, 3\)"),
        (lambda m, x: m.bound(x, 2, y=torch.rand(8)), TypeError, "integer classes"),
        (lambda m, x: m.bound(x, 2), ValueError, "conditional: give y"),
        (lambda m, x: m.sample(8, torch.arange(3)), ValueError, r"shape \(8,\)"),
    ],
)
def test_cvae_bad_y_is_refused(call, error, match):
    pyro.set_rng_seed(0)
    with pytest.raises(error, match=match):
        call(build_vae(D, 2, (8,), num_classes=K), binary())


def test_bad_inputs_to_the_conditional_chain_are_refused():
    plain, chain = chain_twins()
    with pytest.raises(ValueError, match="unconditional"):
        plain.sample(2, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance must be a number w >= 0"):
        chain.sample(2, y=torch.zeros(2, dtype=torch.long), guidance=-1.0)
    with pytest.raises(TypeError, match="integer classes"):
        chain.sample(2, y=torch.zeros(2))
    with pytest.raises(ValueError, match="unconditional"):
        build_vae(D, 2, (8,)).sample(2, torch.zeros(2, dtype=torch.long))


def test_float_y_conditions_the_vae():
    pyro.set_rng_seed(0)
    vae = build_vae(D, 2, (8,), y_shape=(2, 2))
    y = torch.rand(8, 2, 2)
    bound = vae.bound(binary(), 2, y=y)
    assert bound.elbo().shape == (8,)
    with pytest.raises(ValueError, match=r"shape \(8, \*\(2, 2\)\)"):
        vae.bound(binary(), 2, y=torch.rand(8, 4))


# --- the command line ----------------------------------------------------------------------

TINY = ["--data", "digits", "--epochs", "1", "--train-size", "256", "--test-size", "64", "--quiet"]
SMALL = {
    "vae": ["--z-dim", "4", "--hidden", "32"],
    "hvae": ["--z-dims", "4", "2", "--hidden", "32", "--kl-warmup", "0"],
    "diffusion": ["--T", "20", "--channels", "8", "--sample-steps", "5"],
    "vdm": ["--channels", "8", "--sample-steps", "5"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny conditional run of each model, trained from the command line in-process."""
    from pyrovae.cli import main

    folder = tmp_path_factory.mktemp("conditional")
    for model, flags in SMALL.items():
        assert main(["train", model, "--conditional", *TINY, *flags, "--out", str(folder / model)]) == 0
    return folder


@pytest.mark.parametrize("model", list(SMALL))
def test_train_conditional_runs_and_sample_label_all_writes_a_row_per_class(model, runs):
    import json

    import numpy as np

    from pyrovae.checkpoint import load_checkpoint
    from pyrovae.cli import main

    run = runs / model
    assert load_checkpoint(str(run))["data"]["classes"] == [str(k) for k in range(10)]
    assert json.loads((run / "config.json").read_text())["conditional"] is True
    steps = ["--steps", "5"] if model in ("diffusion", "vdm") else []
    out = run / "samples-all.png"
    assert main(["sample", model, str(run), "--label", "all", "--n", "2", *steps, "--out", str(out)]) == 0
    assert out.exists() and np.load(run / "samples-all.npy").shape == (20, 64)


def test_evaluate_gives_the_conditional_bound(runs, capsys):
    import json

    from pyrovae.cli import main

    assert main(["evaluate", "vae", str(runs / "vae"), "--iwae-k", "20"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["test_iwae"] > shown["test_elbo"] - 1.0  # IWAE-20 of log p(x | y), tighter up to noise
    # the model's own marginal: log p(x | y) - log p(x) = log p(y | x) + log K <= log K
    assert shown["test_log_p_y_given_x"] <= 0 and 0 <= shown["test_bayes_accuracy"] <= 1
    assert shown["test_iwae_marginal"] < shown["test_iwae"] + math.log(10) + 0.5
    assert main(["evaluate", "diffusion", str(runs / "diffusion"), "--n", "8"]) == 0
    assert "test_elbo" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "model, flags, message",
    [
        ("vae", ["--label", "12"], r"--label must be a class in \[0, 10\)"),
        ("vae", ["--guidance", "1"], "--guidance is classifier-free guidance of the chain and VDM; a vae has none"),
        ("diffusion", ["--guidance", "-1", "--steps", "5"], "--guidance: must be a number w >= 0"),
        ("diffusion", ["--label", "x", "--steps", "5"], "--label must be a class"),
    ],
)
def test_sample_refuses_bad_labels_and_guidance(model, flags, message, runs, capsys):
    from pyrovae.cli import main

    with pytest.raises(SystemExit) if "-1" in flags else contextlib.nullcontext():
        code = main(["sample", model, str(runs / model), *flags, "--out", str(runs / "bad.png")])
        assert code == 1
    assert re.search(message, capsys.readouterr().err)


def test_label_on_an_unconditional_run_is_refused(tmp_path, capsys):
    from pyrovae.cli import main

    assert main(["train", "vae", *TINY, *SMALL["vae"], "--out", str(tmp_path / "run")]) == 0
    assert main(["sample", "vae", str(tmp_path / "run"), "--label", "3"]) == 1
    assert "--label needs a run trained with --conditional" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["vae", "hvae"])
def test_the_learned_conditional_prior_trains_from_the_cli_and_needs_conditional(model, tmp_path, capsys):
    import torch

    from pyrovae.checkpoint import load
    from pyrovae.cli import main

    assert main(["train", model, *TINY, *SMALL[model], "--prior", "conditional", "--out", str(tmp_path / "bad")]) == 1
    assert "prior 'conditional' is p(z_L | y): it needs a conditional model (--conditional)" in capsys.readouterr().err
    out = str(tmp_path / "run")
    assert main(["train", model, "--conditional", *TINY, *SMALL[model], "--prior", "conditional", "--out", out]) == 0
    loaded, _ = load(out)
    assert loaded.prior.net.weight.abs().sum() > 0  # p(z_L | y) learned and saved with the run
    top = loaded.top_prior(loaded.y_features(torch.tensor([3, 4]), 2, torch.zeros(())))
    assert not torch.equal(top.base_dist.loc[0], top.base_dist.loc[1])


def test_iwae_of_a_conditional_vae_is_of_log_p_x_given_y_and_tighter_than_its_elbo():
    """IWAE-k given y: at k = 1 it is the ELBO's estimate (in expectation, within
    its Monte Carlo error), with k = 200 above the ELBO by more than that error,
    and y reaches it (another label gives another value)."""
    import math

    import torch

    from pyrovae.infer import evaluate_iwae
    from pyrovae.infer.iwae import iwae_log_likelihood
    from pyrovae.vae import build_vae

    torch.manual_seed(0)
    cvae = build_vae(16, z_dim=2, hidden=(16,), num_classes=3)
    x, y = torch.bernoulli(torch.full((6, 16), 0.4)), torch.tensor([0, 1, 2, 0, 1, 2])
    elbo = cvae.bound(x, 4000, y=y).elbo()
    one = iwae_log_likelihood(cvae.model, cvae.guide, x.repeat(1000, 1), 1, y=y.repeat(1000)).reshape(1000, 6)
    se = one.std(0) / math.sqrt(1000)
    assert ((one.mean(0) - elbo).abs() < 4 * se + 0.05).all(), (one.mean(0), elbo, se)
    tight = iwae_log_likelihood(cvae.model, cvae.guide, x, 200, y=y)
    assert (tight > elbo + 4 * se).any() and (tight > elbo - 4 * se).all()
    other = evaluate_iwae(cvae.model, cvae.guide, x, 50, y=(y + 1) % 3)["iwae"]
    assert abs(other - evaluate_iwae(cvae.model, cvae.guide, x, 50, y=y)["iwae"]) > 0.01


def test_class_marginal_of_a_cvae_equals_the_closed_form_where_x_does_not_depend_on_z():
    """With the decoder's z-columns zeroed, p(x | c) = p(x | z, c) for every z,
    a closed form: the model's own marginal log (1/K) sum_c p(x | c), log p(y | x)
    and the Bayes classifier's accuracy must equal the closed forms (IWAE-k
    with a 1-d z and k = 2000 is exact up to a small bias)."""
    import math

    import torch

    from pyrovae.infer.iwae import class_marginal_iwae
    from pyrovae.vae import build_vae

    torch.manual_seed(0)
    cvae = build_vae(12, z_dim=1, hidden=(8,), num_classes=3)
    first = next(m for m in cvae.decoder.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight[:, :1] = 0.0  # the decoder's input is (z, one-hot y): z dropped
        first.weight[:, 1:] += 2 * torch.randn_like(first.weight[:, 1:])  # classes far apart
    x, y = torch.bernoulli(torch.full((9, 12), 0.5)), torch.arange(9) % 3
    z = torch.zeros(9, 1)
    with torch.no_grad():
        given = [cvae.likelihood(cvae.decoder(cvae.with_y(z, torch.full((9,), c)))).log_prob(x) for c in range(3)]
    exact = torch.stack(given, -1)
    log_px = torch.logsumexp(exact, -1) - math.log(3)
    got = class_marginal_iwae(cvae.model, cvae.guide, x, y, 2000, 3)
    assert got["iwae_marginal"] == pytest.approx(float(log_px.mean()), abs=0.02)
    want = float((exact.gather(-1, y[:, None])[:, 0] - math.log(3) - log_px).mean())
    assert got["log_p_y_given_x"] == pytest.approx(want, abs=0.03) and got["log_p_y_given_x"] <= 0
    assert got["bayes_accuracy"] == pytest.approx(float((exact.argmax(-1) == y).double().mean()))


def test_conditional_refuses_data_without_labels(tmp_path):
    import numpy as np

    from pyrovae.cli import main

    path = tmp_path / "unlabelled.npy"
    np.save(path, (np.random.default_rng(0).random((60, 8, 8)) > 0.5).astype(np.float32))
    argv = ["train", "vae", "--data", str(path), "--conditional", "--epochs", "1", "--quiet", "--debug"]
    with pytest.raises(ValueError, match="--conditional needs labelled data; data .* has no labels .*image folders"):
        main([*argv, "--out", str(tmp_path / "run")])


def test_the_loader_never_gives_the_null_class_and_p_uncond_drops_labels():
    from pyrovae.config import TrainConfig
    from pyrovae.data import load_dataset
    from pyrovae.recipes.conditional import ConditionalLoss
    from pyrovae.ssvae import pack_labels
    from pyrovae.train import make_shard_loader

    ds = load_dataset("digits").subset(256, 10)
    loader, _ = make_shard_loader(ds.x_train, ds.y_train, TrainConfig(model="diffusion", data="digits"))
    assert all(bool((yb >= 0).all()) for _, yb in loader)

    seen = []

    class Spy:
        def differentiable_loss(self, model, guide, x, y):
            seen.append(y)
            return x.sum()

    batch = pack_labels(torch.zeros(4000, 2), torch.arange(4000) % 10)
    pyro.set_rng_seed(0)
    ConditionalLoss(Spy(), p_uncond=0.1).differentiable_loss(None, None, batch)
    ConditionalLoss(Spy()).differentiable_loss(None, None, batch)
    dropped = (seen[0] == -1).float().mean()
    assert abs(dropped - 0.1) < 5 * (0.1 * 0.9 / 4000) ** 0.5  # 5 binomial standard errors
    assert bool((seen[1] >= 0).all())
