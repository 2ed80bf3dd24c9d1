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
    },
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every workload through the CLI: (exit code, printed
    table, JSON report)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--smoke", "--json", str(path)])
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
        assert {r["variant"] for r in results if r["case"] == case} == VARIANTS[workload], case


def test_times_are_positive_and_finite_and_ratios_are_to_the_floor(smoke):
    _, _, report = smoke
    results = report["results"]
    for r in results:
        assert len(r["times_ms"]) == report["header"]["repeats"]
        assert all(math.isfinite(t) and t > 0 for t in r["times_ms"]), r
        floor = next(f for f in results if (f["workload"], f["case"], f["variant"]) == (r["workload"], r["case"], bench.FLOOR))
        assert r["ratio"] == pytest.approx(r["ms"] / floor["ms"])


def test_table_shows_every_result_and_the_header(smoke):
    _, table, report = smoke
    head = report["header"]
    assert head["threads"] == torch.get_num_threads() and head["device"] == "cpu"
    assert f"device cpu, torch threads {head['threads']}" in table
    lines = table.splitlines()
    for r in report["results"]:
        assert any(r["case"] in line and r["variant"] in line and f"{r['ms']:.2f}" in line for line in lines), r


def test_unknown_workload_is_an_error_naming_it(capsys):
    assert main(["bench", "--smoke", "nope"]) == 1
    assert "unknown workload 'nope'" in capsys.readouterr().err
