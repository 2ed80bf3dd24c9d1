"""Objectives (ELBO variants) and evaluators."""

from pyrovae.infer.elbos import ELBOS, make_elbo

__all__ = ["ELBOS", "make_elbo"]
