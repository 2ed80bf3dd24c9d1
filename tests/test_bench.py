"""``pyrovae bench --smoke``: every workload runs every variant and reports it in
the table and the JSON. Times are checked for sanity only (positive, finite),
never against each other."""

import contextlib
import io
import json
import math

import pytest
import torch

from pyrovae import bench
from pyrovae.cli import main

VARIANTS = {
    "vae": {
        bench.FLOOR,
        "pyrovae TraceAnalyticKL_ELBO",
        "Trace_ELBO",
        "TraceMeanField_ELBO",
        "JitTrace_ELBO",
        "JitTraceMeanField_ELBO",
        bench.SVI_ONE_ADAM,
        bench.TRAINER,
        bench.TRAINER_CAPTURED,
        bench.TRAINER_COMPILED,
        bench.FLOOR_COMPILED,
    },
    "diffusion": {bench.FLOOR, "pyrovae DiffusionELBO", bench.TRAINER},
    "train": {bench.FLOOR, bench.RUN_NO_VALIDATE, bench.RUN_VALIDATE, bench.RUN_COMPILED},
    "ddp": {bench.FLOOR, bench.DDP, bench.DDP_NO_SYNC},
    "m2": {bench.FLOOR, bench.TRAINER, bench.m2.SVI_ANALYTIC, bench.m2.TRAINER_ENUM, bench.m2.SVI_ENUM},
    "conditional": {bench.conditional.UNCONDITIONAL, bench.conditional.CONDITIONAL},
    "bound": {
        bench.FLOOR,
        "pyrovae full_bound (batched over t)",
        "TraceMeanField_ELBO per-site chain",
        "pyrovae TraceAnalyticKL_ELBO per-site chain",
    },
}
# the literal chain under stock Trace_ELBO runs for the MLP at T = literal_T only
LITERAL = "Trace_ELBO literal chain"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every workload through the CLI: (exit code, printed
    table, JSON report)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # one thread: on a machine shared by many processes two OpenMP threads
        # per process can make each call a hundred times slower
        rc = main(["bench", "--smoke", "--threads", "1", "--json", str(path)])
    return rc, out.getvalue(), json.loads(path.read_text())


def test_smoke_run_exits_zero_and_covers_every_workload(smoke):
    rc, _, report = smoke
    assert rc == 0
    assert {r["workload"] for r in report["results"]} == set(bench.WORKLOADS)


@pytest.mark.parametrize("workload", sorted(VARIANTS))
def test_every_case_reports_every_variant(smoke, workload):
    _, _, report = smoke
    results = [r for r in report["results"] if r["workload"] == workload]
    for case in {r["case"] for r in results}:
        rows = [r for r in results if r["case"] == case]
        expected = set(VARIANTS[workload])
        if workload == "diffusion" and rows[0]["params"] == {"denoiser": "mlp", "T": bench.SMOKE.literal_T}:
            expected.add(LITERAL)
        if workload == "bound" and rows[0]["params"]["denoiser"] == "unet":
            expected = {bench.FLOOR, "pyrovae full_bound (batched over t)"}
        assert {r["variant"] for r in rows} == expected, case


SAMPLERS = {"pyrovae ancestral", "pyrovae DDIM eta 0", "pyrovae DPM-Solver++ 2M"}


def test_sample_workload_times_ancestral_and_strided_sampling(smoke):
    _, _, report = smoke
    variants = {r["variant"] for r in report["results"] if r["workload"] == "sample" and "steps" not in r["params"]}
    assert variants == {bench.FLOOR, "pyrovae sample", f"pyrovae sample(steps={bench.SMOKE.sample_steps})"}


def test_sample_workload_times_every_sampler_against_the_forward_passes_at_each_step_count(smoke):
    _, _, report = smoke
    rows = [r for r in report["results"] if r["workload"] == "sample" and "steps" in r["params"]]
    expected = {("mlp", k) for k in bench.SMOKE.sampler_steps} | {("unet", k) for k in bench.SMOKE.sampler_unet_steps}
    assert {(r["params"]["denoiser"], r["params"]["steps"]) for r in rows} == expected
    for denoiser, steps in expected:
        case = [r for r in rows if (r["params"]["denoiser"], r["params"]["steps"]) == (denoiser, steps)]
        assert {r["variant"] for r in case} == {bench.FLOOR} | SAMPLERS
        assert all(r["target"] == 1.05 for r in case if r["variant"] != bench.FLOOR)


def test_sampler_floor_calls_the_network_at_the_ddim_grids_times():
    """The floor's inputs: one (x, tau) per step, tau the time the chain tells
    its network at each of the grid's steps (the samplers' network calls)."""
    from pyrovae.diffusion.samplers import ChainView

    chain = bench.cases._chain(bench.SMOKE, "mlp", 10, torch.device("cpu"))
    seen = []
    chain.net.register_forward_hook(lambda m, args, out: seen.append(args[1][0].item()))
    cases = list(bench.cases.sampler_cases(chain, bench.SMOKE.sampler_steps, 2, torch.device("cpu")))
    cases[0].variants[bench.FLOOR]()
    floor_taus, seen[:] = list(seen), []
    cases[0].variants["pyrovae DDIM eta 0"]()
    assert (
        len(floor_taus) == bench.SMOKE.sampler_steps[0] == len(ChainView(chain).grid(bench.SMOKE.sampler_steps[0])) - 1
    )
    assert floor_taus == pytest.approx(seen)


def test_diffusion_reports_the_literal_chain_and_the_growth_with_T(smoke):
    _, table, report = smoke
    assert LITERAL in {r["variant"] for r in report["results"]}
    checks = report["checks"]
    assert [c["check"].split(":")[0] for c in checks] == [f"diffusion {d}" for d in bench.SMOKE.denoisers]
    for c in checks:
        assert math.isfinite(c["ratio"]) and c["ratio"] > 0 and c["check"] in table


def test_times_are_positive_and_finite_and_ratios_are_to_the_floor(smoke):
    _, _, report = smoke
    results = report["results"]
    for r in results:
        assert len(r["times_ms"]) in (
            report["header"]["repeats"],
            report["header"]["slow_repeats"],
            report["header"]["train_repeats"],
        )
        assert all(math.isfinite(t) and t > 0 for t in r["times_ms"]), r
        floor = next(
            f for f in results if (f["workload"], f["case"], f["variant"]) == (r["workload"], r["case"], r["reference"])
        )
        assert r["ratio"] == pytest.approx(r["ms"] / floor["ms"])


def test_table_shows_every_result_and_the_header(smoke):
    _, table, report = smoke
    head = report["header"]
    assert head["threads"] == 1 and head["device"] == "cpu"
    assert f"device cpu, torch threads {head['threads']}" in table
    lines = table.splitlines()
    for r in report["results"]:
        assert any(r["case"] in line and r["variant"] in line and f"{r['ms']:.2f}" in line for line in lines), r


def test_conditional_reports_each_twins_step_and_the_ratio_with_its_spread(tmp_path):
    """``pyrovae bench conditional``: the VAE and the U-Net chain, each with both
    twins' times, the ratio conditional / unconditional (the unconditional step
    is the reference) and the per-repeat ratios' quartiles, in the JSON and the table."""
    path = tmp_path / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--smoke", "--threads", "1", "conditional", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = report["results"]
    assert {r["params"]["model"] for r in rows} == {"vae", "diffusion"}
    assert all(r["reference"] == bench.conditional.UNCONDITIONAL and r["ms"] > 0 for r in rows)
    assert len(report["conditional"]) == 2
    for check in report["conditional"]:
        assert check["ratio"] > 0 and check["conditional_ms"] > 0 and check["unconditional_ms"] > 0
        assert check["ratio"] == pytest.approx(check["conditional_ms"] / check["unconditional_ms"])
        q1, q3 = check["paired_quartiles"]
        assert q1 <= check["paired_median"] <= q3 and check["target"] == 1.02
        assert check["check"] in out.getvalue()


def test_unknown_workload_is_an_error_naming_it(capsys):
    assert main(["bench", "--smoke", "nope"]) == 1
    assert "unknown workload 'nope'" in capsys.readouterr().err


def test_threads_are_restored_after_the_run():
    before = torch.get_num_threads()
    assert main(["bench", "--smoke", "--threads", "1", "vae", "--repeats", "1"]) == 0
    assert torch.get_num_threads() == before


class _NoStep:
    """An optimiser stand-in, so that a floor step only computes its loss."""

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def test_vae_floor_computes_the_analytic_elbo_of_the_same_draws():
    from pyrovae.infer import TraceAnalyticKL_ELBO
    from pyrovae.vae import build_vae

    vae = build_vae(12, 3, (8,))
    x = torch.bernoulli(torch.full((5, 12), 0.4))
    torch.manual_seed(3)
    floor = bench.vae_torch_step(vae, _NoStep(), x)
    torch.manual_seed(3)
    ours = TraceAnalyticKL_ELBO().loss(vae.model, vae.guide, x)
    assert floor == pytest.approx(ours, rel=1e-6)


def test_m2_floor_computes_the_semi_supervised_loss_of_the_same_draws():
    """The hand-written M2 step's loss (K classes batched by hand, closed-form
    KLs) equals SemiSupervisedLoss with the enumerated analytic ELBO, labelled
    and unlabelled examples in one batch, for the same draws of z."""
    from pyrovae.ssvae import SSVAE, SemiSupervisedLoss, pack_labels

    m2 = SSVAE(12, 3, 2, (8,), aux_weight=5.0)
    x = torch.bernoulli(torch.full((6, 12), 0.4))
    batch = pack_labels(x, torch.tensor([-1, 2, -1, -1, 0, -1]))
    torch.manual_seed(3)
    floor = bench.m2_torch_step(m2, _NoStep(), batch)
    torch.manual_seed(3)
    ours = SemiSupervisedLoss().differentiable_loss(m2.model, m2.guide, batch).item()
    assert floor == pytest.approx(ours, rel=1e-6)


def test_targets_are_marked_met_or_missed_in_the_table(smoke):
    _, table, report = smoke
    targeted = [r for r in report["results"] if r["target"] is not None]
    assert {(r["workload"], r["variant"]) for r in targeted} >= {
        ("diffusion", bench.TRAINER),
        ("train", bench.RUN_NO_VALIDATE),
    }
    for r in targeted:
        word = "met" if r["ratio"] <= r["target"] else "MISSED"
        assert any(r["variant"] in line and f"<= {r['target']:.2f}  {word}" in line for line in table.splitlines()), r


def test_the_compiled_step_is_reported_against_the_compiled_floor(smoke):
    _, table, report = smoke
    vae_cases = {r["case"] for r in report["results"] if r["workload"] == "vae"}
    assert len(report["compiled"]) == len(vae_cases) >= 1
    for check in report["compiled"]:
        assert math.isfinite(check["ratio"]) and check["ratio"] > 0
        assert check["check"] in table


def test_diffusion_floor_computes_the_chains_bound_terms():
    """L_T + T * sum_b L_{t_b - 1}, with t = 1 (the decoder) among the times."""
    chain = bench.cases._chain(bench.SMOKE, "mlp", 10, torch.device("cpu"))
    x0 = bench.cases._images(6, bench.SMOKE, torch.device("cpu"))
    t = torch.tensor([1, 2, 5, 10, 1, 7])
    noise = torch.randn_like(x0)
    with torch.no_grad():
        floor = bench.TorchDDPM(chain).loss(x0, t, noise)
        x_t = chain.schedule.q_sample(x0, t, noise)
        ours = chain.prior_kl(x0).sum() + chain.T * chain.vb_terms(x0, x_t, t).sum()
    assert floor.item() == pytest.approx(ours.item(), rel=1e-5)


@pytest.mark.parametrize("steps", [None, 4])
def test_sampling_floor_draws_the_chains_samples(steps):
    """Same seed, same draws: the floor's loop returns what ``chain.sample`` returns
    (the decoder's mean given x_1), so the sample rows compare equal work."""
    chain = bench.cases._chain(bench.SMOKE, "mlp", 10, torch.device("cpu"))
    floor = bench.TorchDDPM(chain if steps is None else chain.respaced(steps))
    torch.manual_seed(5)
    ours = chain.sample(3, steps)
    torch.manual_seed(5)
    torch.testing.assert_close(floor.sample(3), ours, rtol=1e-5, atol=1e-6)


def test_ddp_reports_samples_per_second_and_the_all_reduce_for_both_models(smoke):
    """Two gloo processes against one: both cases, each with samples/s for 1 and
    2 processes, the speed-up and the all-reduce's ms, in the JSON and the table;
    the load average in the header."""
    _, table, report = smoke
    cases = {r["case"] for r in report["results"] if r["workload"] == "ddp"}
    assert {c.split()[0] for c in cases} == {"vae", "unet"}
    assert len(report["ddp"]) == 2
    for check in report["ddp"]:
        assert check["limit"] == 2 and math.isfinite(check["allreduce_ms"]) and check["check"] in table
        assert set(check["samples_per_s"]) == {"1", "2"} and all(v > 0 for v in check["samples_per_s"].values())
        assert check["ratio"] == pytest.approx(check["samples_per_s"]["2"] / check["samples_per_s"]["1"])
    assert len(report["header"]["load_average"]) == 3 and "load average" in table
