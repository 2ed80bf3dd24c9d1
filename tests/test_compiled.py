"""The compiled path (pyrovae.compiled): the loss captured once per batch shape
and replayed equals the eager loss, follows the parameters and kl_scale, and
stays eager, saying why, where a graph cannot hold the program."""

import csv
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from pyrovae.cli import main
from pyrovae.compiled import CompiledLoss, compile_loss
from pyrovae.hvae import build_hvae
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.train import LossModule
from pyrovae.vae import build_vae


def binary(n: int, d: int, seed: int = 3) -> torch.Tensor:
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def warm(captured: CompiledLoss, x: torch.Tensor) -> CompiledLoss:
    """The first call of a shape captures its graph (after an eager run whose
    draws are put back) and replays it, as every later call does."""
    captured(x)
    return captured


def loss_and_grads(fn, module, x, seed: int = 4):
    torch.manual_seed(seed)
    loss = fn(x)
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def captured_vae(**elbo_args):
    """A small VAE, a batch, its ELBO, the eager loss module and the captured
    one (warmed on the batch): ``(model, x, elbo, eager, captured)``."""
    model = build_vae(12, 3, (7,))
    x = binary(9, 12)
    elbo = TraceAnalyticKL_ELBO(max_plate_nesting=1, **elbo_args)
    eager = LossModule(model, elbo)
    return model, x, elbo, eager, warm(CompiledLoss(eager, backend=None), x)


MODELS = {
    "vae": lambda: build_vae(12, 3, (7,)),
    # a bottom-up encoder: one layer's KL is Monte Carlo, the other closed form
    "hvae bottom-up": lambda: build_hvae(12, (4, 2), [(6,), (5,)], encoder="bottom-up"),
    "hvae top-down": lambda: build_hvae(12, (4, 2), [(6,), (5,)], encoder="top-down"),
}


@pytest.mark.parametrize("name", MODELS)
def test_the_replayed_graph_gives_the_eager_loss_and_gradients_bit_for_bit(name):
    model = MODELS[name]()
    x = binary(9, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the bottom-up encoder's Monte Carlo notice
        eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
        captured = warm(CompiledLoss(eager, backend=None), x)
        want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
    assert captured.graphs == 1 and captured.failed is None
    assert torch.equal(want[0], got[0])
    for a, b in zip(want[1], got[1]):
        assert torch.equal(a, b)


PARTS = (
    [{"prior": name} for name in ("normal", "mog", "vamp", "flow")]
    + [{"guide": name} for name in ("lowrank", "full", "iaf")]
    + [
        {"likelihood": name}
        for name in ("continuous-bernoulli", "gaussian", "discretised-logistic", "discretised-gaussian")
    ]
    + [{"net": "conv", "image_shape": (3, 8, 8)}]
)


@pytest.mark.parametrize("parts", PARTS, ids=lambda parts: "-".join(map(str, parts.values())))
def test_every_shipped_part_captures_and_replays_the_eager_loss_bit_for_bit(parts):
    torch.manual_seed(0)
    d = 192 if "image_shape" in parts else 12
    model = build_vae(d, 3, (7,), **parts)
    x = binary(9, d) if "likelihood" not in parts else torch.rand(9, d, generator=torch.Generator().manual_seed(2))
    eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    captured = warm(CompiledLoss(eager, backend=None), x)
    assert captured.failed is None and captured.graphs == 1  # captured, not left eager
    # the capture leaves no fake tensor behind in the modules' attributes (a flow caches its last x, y)
    for name, module in model.named_modules():
        for attr, value in module.__dict__.items():
            for v in value if isinstance(value, tuple) else (value,):
                assert not isinstance(v, FakeTensor), (name, attr)
    want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
    assert torch.equal(want[0], got[0])
    for a, b in zip(want[1], got[1]):
        assert torch.equal(a, b)


def test_a_backend_that_cannot_compile_leaves_the_captured_graph_with_a_warning():
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = build_vae(12, 3, (7,))
    x = binary(9, 12)
    eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    compiled = CompiledLoss(eager, backend=broken)
    with pytest.warns(UserWarning, match="could not compile"):
        got = loss_and_grads(compiled, model, x)
    want = loss_and_grads(eager, model, x)
    assert torch.equal(want[0], got[0]) and compiled.graphs == 1
    assert torch.equal(loss_and_grads(compiled, model, x)[0], want[0])  # the plain graph from now on


def test_inductor_compiled_graph_matches_the_eager_loss_with_torchs_random_draws(monkeypatch):
    # inductor draws from its own generator unless told to use torch's
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model = build_vae(12, 3, (7,))
    x = binary(9, 12)
    eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    compiled = warm(CompiledLoss(eager, backend="inductor"), x)
    want, got = loss_and_grads(eager, model, x), loss_and_grads(compiled, model, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-4)
    for a, b in zip(want[1], got[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_the_replay_reads_the_parameters_after_each_optimiser_step():
    model, x, _, eager, captured = captured_vae()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        optimizer.zero_grad()
        torch.manual_seed(step)
        captured(x).backward()
        optimizer.step()
        want, got = loss_and_grads(eager, model, x, seed=10 + step), loss_and_grads(captured, model, x, seed=10 + step)
        assert torch.equal(want[0], got[0])
    assert captured.graphs == 1


def test_a_kl_warmup_reuses_the_graph_and_weights_the_kl_as_eager_does():
    model, x, elbo, eager, captured = captured_vae()
    for beta in (0.0, 0.25, 1.0):
        elbo.kl_scale = beta
        want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
        assert torch.equal(want[0], got[0]), beta
        for a, b in zip(want[1], got[1]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert captured.graphs == 1


def test_each_new_batch_shape_and_mode_gets_its_own_graph():
    model = build_vae(12, 3, (7,))
    captured = CompiledLoss(LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1)), backend=None)
    for n in (8, 5, 8):
        captured(binary(n, 12))
    assert captured.graphs == 2
    captured.eval()
    with torch.no_grad():
        captured(binary(8, 12))
    assert captured.graphs == 3


class Branching(torch.nn.Module):
    """A model whose Python branches on its data's values: no graph can hold it."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.loc, 1.0).to_event(1))
            scale = 2.0 if x.sum() > 0 else 1.0
            pyro.sample("x", dist.Normal(z, scale).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))


def test_a_program_that_branches_on_values_runs_eagerly_and_says_why():
    model = Branching()
    x = torch.randn(4, 3)
    eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    captured = CompiledLoss(eager, backend=None)
    with pytest.warns(UserWarning, match="could not be captured"):
        captured(x)
    assert captured.failed and captured.graphs == 0
    torch.manual_seed(0)
    want = eager(x)
    torch.manual_seed(0)
    assert torch.equal(captured(x), want)


def test_the_first_batch_is_validated_eagerly_as_without_compile():
    model = build_vae(12, 3, (7,))
    captured = CompiledLoss(LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1)), backend=None)
    grey = torch.full((4, 12), 0.5)
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="binary"):
        captured(grey)


def test_mixed_precision_runs_eagerly_with_a_warning():
    model = build_vae(12, 3, (7,))
    eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    captured = CompiledLoss(eager, backend=None)
    x = binary(4, 12)
    with torch.autocast("cpu", torch.bfloat16), pytest.warns(UserWarning, match="autocast"):
        torch.manual_seed(0)
        got = captured(x)
        torch.manual_seed(0)
        want = eager(x)
    assert torch.equal(got, want) and captured.graphs == 0


def chain_and_vdm():
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.denoisers import TimeMLP
    from pyrovae.diffusion.gamma import make_gamma
    from pyrovae.diffusion.schedule import NoiseSchedule
    from pyrovae.diffusion.vdm import VDM
    from pyrovae.infer.vdm_elbo import VDMELBO

    chain = DiffusionChain(TimeMLP(4, (8,)), NoiseSchedule.from_name("linear", 10), 4, decoder="discretised")
    vdm = VDM(TimeMLP(4, (8,)), make_gamma("learned-linear"), 4)
    return [(chain, DiffusionELBO(time_sampler="importance")), (vdm, VDMELBO())]


def test_objectives_that_keep_state_are_compiled_by_dynamo_with_the_eager_loss():
    model, objective = chain_and_vdm()[0]
    eager = LossModule(model, objective)
    # backend None: dynamo's capture of the Python (graph breaks at the value-dependent
    # branches and the time sampler's update) without inductor's minutes of code generation
    compiled = compile_loss(eager, backend=None)
    assert not isinstance(compiled, CompiledLoss)
    with pytest.raises(TypeError, match="capturable"):
        CompiledLoss(eager)
    x = torch.randint(0, 256, (6, 4)) / 127.5 - 1
    want, got = loss_and_grads(eager, model, x), loss_and_grads(compiled, model, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
    for a, b in zip(want[1], got[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_vdm_objective_is_refused_by_compile_loss():
    """Dynamo cannot trace VDMELBO's loss from a fresh process ("VDM.model is not a constant"; it passed here only
    when the chain's case had run first), and with that fixed aot_autograd raises on the double backward that
    gamma'(t), a derivative inside the loss, needs: compile_loss refuses it before a run writes anything (issue 24)."""
    model, objective = chain_and_vdm()[1]
    with pytest.raises(ValueError, match="--compile does not work with this model's objective, VDMELBO"):
        compile_loss(LossModule(model, objective), backend=None)


def test_train_vae_with_compile_runs_the_captured_loss_and_learns(tmp_path, monkeypatch):
    seen = []
    replay = CompiledLoss.forward

    def spy(self, batch):
        seen.append(self)
        return replay(self, batch)

    monkeypatch.setattr(CompiledLoss, "forward", spy)
    out = tmp_path / "run"
    argv = [
        "train",
        "vae",
        "--data",
        "digits",
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--batch-size",
        "32",
        "--z-dim",
        "3",
        "--hidden",
        "8",
        "--quiet",
        "--no-validate",
        "--epochs",
        "3",
        "--compile",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    elbos = [float(r["train_elbo"]) for r in rows]
    assert seen and seen[0].failed is None and seen[0].graphs == 1
    assert elbos[-1] > elbos[0]


def test_a_compiled_run_resumed_from_its_checkpoint_continues_bit_for_bit(tmp_path):
    # 40 examples in batches of 16: two batch shapes, so two graphs, each captured again
    # after the resumption; every step draws from the graph, the first included
    tiny = [
        "--data",
        "digits",
        "--train-size",
        "40",
        "--test-size",
        "16",
        "--batch-size",
        "16",
        "--z-dim",
        "3",
        "--hidden",
        "8",
        "--quiet",
        "--no-validate",
        "--compile",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "vae", *tiny, "--epochs", "4", "--out", str(straight)]) == 0
    assert main(["train", "vae", *tiny, "--epochs", "2", "--out", str(resumed)]) == 0
    assert main(["train", "vae", "--resume", str(resumed), "--epochs", "4", "--quiet"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with open(straight / "metrics.csv", newline="") as f, open(resumed / "metrics.csv", newline="") as g:
        strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
        assert strip(csv.DictReader(f)) == strip(csv.DictReader(g))


def test_switching_a_submodule_to_eval_mode_gets_its_own_graph():
    """model.eval() (not the loss module's) turns dropout off: the replay must follow."""
    model = build_vae(12, 3, (7,))
    model.decoder = torch.nn.Sequential(model.decoder, torch.nn.Dropout(0.5))
    x = binary(9, 12)
    eager = LossModule(model, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    captured = warm(CompiledLoss(eager, backend=None), x)
    model.eval()
    want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
    assert torch.equal(want[0], got[0]) and captured.graphs == 2


def test_the_replay_reads_tensors_that_replace_the_parameters_and_follows_their_dtype():
    model, x, _, eager, captured = captured_vae()
    other = build_vae(12, 3, (7,)).state_dict()
    model.load_state_dict(other, assign=True)  # new tensor objects in the modules' dicts
    want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
    assert torch.equal(want[0], got[0])
    model.double()
    want, got = loss_and_grads(eager, model, x.double()), loss_and_grads(captured, model, x.double())
    assert got[0].dtype == torch.float64 and torch.equal(want[0], got[0]) and captured.graphs == 2


class DiscreteLatent(torch.nn.Module):
    """k ~ Bernoulli (no reparameterisation: the score function), then z | k
    Normal (closed-form KL): the surrogate's observed and latent parts both count."""

    def __init__(self):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(0.3))
        self.loc = torch.nn.Parameter(torch.tensor([0.5, -0.2]))
        self.q_logit = torch.nn.Parameter(torch.tensor(-0.1))
        self.q_loc = torch.nn.Parameter(torch.tensor([0.1, 0.2]))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(logits=self.logit))
            z = pyro.sample("z", dist.Normal(self.loc * k.unsqueeze(-1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(logits=self.q_logit + 0.0 * x[:, 0]))
            pyro.sample("z", dist.Normal(self.q_loc + x * 0.1 + k.unsqueeze(-1), 0.8).to_event(1))


@pytest.mark.parametrize("particles,vectorize", [(1, False), (3, False), (3, True)])
def test_a_discrete_latent_and_several_particles_replay_the_eager_loss_and_score_gradients(particles, vectorize):
    model = DiscreteLatent()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    elbo = TraceAnalyticKL_ELBO(
        num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1, kl_scale=0.5
    )
    eager = LossModule(model, elbo)
    captured = warm(CompiledLoss(eager, backend=None), x)
    assert captured.failed is None
    want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
    assert torch.equal(want[0], got[0])
    for a, b in zip(want[1], got[1]):
        assert torch.equal(a, b)
    assert got[1][2].abs() > 0  # the guide's Bernoulli logit learns through the score function


def test_changing_the_number_of_particles_gets_a_new_graph():
    model, x, elbo, eager, captured = captured_vae()
    elbo.num_particles = 4
    want, got = loss_and_grads(eager, model, x), loss_and_grads(captured, model, x)
    assert torch.equal(want[0], got[0]) and captured.graphs == 2
