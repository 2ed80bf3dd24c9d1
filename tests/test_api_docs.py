"""The API reference (``docs/api``, Sphinx autodoc over the public modules)
builds with warnings as errors, so a docstring that is not valid
reStructuredText fails the test suite. Built in-process, HTML only, nothing
downloaded."""

from __future__ import annotations

import pathlib

import pytest

sphinx_build = pytest.importorskip("sphinx.cmd.build")
inventory = pytest.importorskip("sphinx.util.inventory")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    warnings = out / "warnings.txt"
    args = ["-W", "--keep-going", "-q", "-E", "-w", str(warnings), "-b", "html"]
    status = sphinx_build.build_main([*args, str(ROOT / "docs" / "api"), str(out / "html")])
    return status, warnings.read_text() if warnings.exists() else "", out / "html"


def test_api_reference_builds_without_a_warning(built):
    status, warnings, _ = built
    assert status == 0 and not warnings.strip(), f"sphinx-build -W failed:\n{warnings}"


@pytest.mark.parametrize(
    "name",
    [
        "pyrovae.vae.build_vae",
        "pyrovae.hvae.HVAE",
        "pyrovae.parts.priors.VampPrior",
        "pyrovae.diffusion.chain.DiffusionChain",
        "pyrovae.diffusion.vdm.VDM",
        "pyrovae.infer.analytic_elbo.TraceAnalyticKL_ELBO",
        "pyrovae.train.train",
        "pyrovae.data.sources.load_dataset",
        "pyrovae.checks.check_finite",
    ],
)
def test_api_reference_documents_each_public_area(built, name):
    _, _, html = built
    with open(html / "objects.inv", "rb") as f:
        names = {
            entry
            for _, entries in inventory.InventoryFile.load(f, "", pathlib.PurePosixPath).items()
            for entry in entries
        }
    assert name in names
