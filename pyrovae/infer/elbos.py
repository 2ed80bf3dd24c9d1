"""Choosing an ELBO estimator by name (the CLI's ``--elbo``)."""

from __future__ import annotations

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyrovae.infer.analytic_elbo import TraceAnalyticKL_ELBO
from pyrovae.registry import lookup

ELBOS = {
    "analytic": TraceAnalyticKL_ELBO,
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
}


def make_elbo(name: str, **kwargs) -> ELBO:
    """An ELBO instance by name; ``kwargs`` (``num_particles``,
    ``vectorize_particles``, ...) go to its constructor."""
    return lookup("elbo", name, ELBOS)(**kwargs)
