"""Objectives (ELBO variants) and evaluators."""

from pyrovae.infer.analytic_elbo import TraceAnalyticKL_ELBO
from pyrovae.infer.elbos import ELBOS, make_elbo
from pyrovae.infer.iwae import evaluate_iwae, iwae_log_likelihood, log_importance_weights

__all__ = [
    "ELBOS",
    "make_elbo",
    "TraceAnalyticKL_ELBO",
    "evaluate_iwae",
    "iwae_log_likelihood",
    "log_importance_weights",
]
