"""Objectives (ELBO variants) and evaluators."""

from pyrovae.infer.analytic_elbo import TraceAnalyticKL_ELBO
from pyrovae.infer.elbos import ELBOS, make_elbo

__all__ = ["ELBOS", "make_elbo", "TraceAnalyticKL_ELBO"]
