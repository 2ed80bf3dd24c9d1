"""How ``pyrovae train vae --labelled N`` builds, feeds and evaluates the
semi-supervised VAE (M2, :class:`pyrovae.ssvae.SSVAE`): the VAE's recipe with
labels. N training labels, balanced over the classes and chosen by the run's
seed, are kept; every other training label is hidden (-1). A batch is x with
its label column appended (:func:`pack_labels`)."""

from __future__ import annotations

import dataclasses

import torch

from pyrovae import data as datasets
from pyrovae.early_stopping import SELECT_BY_ACCURACY
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.infer.bound import bound_terms, prefixed
from pyrovae.parts.likelihoods import LIKELIHOODS
from pyrovae.recipes.vae import VAERecipe
from pyrovae.ssvae import SSVAE, SemiSupervisedLoss, pack_labels, unpack_labels


class SSVAERecipe(VAERecipe):
    #: M2 is a classifier first: ``--early-stopping`` keeps the epoch of best
    #: held-out accuracy of q_phi(y | x) (the rule of Pyro's ss_vae_M2 example),
    #: not of best held-out bound, which rises while the accuracy wanders.
    select_by = SELECT_BY_ACCURACY

    def check(self, cfg) -> None:
        """The VAE's rules, and M2's: a diagonal Normal encoder, an MLP, the
        analytic ELBO, no KL warm-up, no compiled path."""
        super().check(cfg)
        for name, value, want in (
            ("guide", cfg.guide, "diag"),
            ("net", self.net(cfg), "mlp"),
            ("prior", cfg.prior, "normal"),
            ("elbo", cfg.elbo, "analytic"),
        ):
            if value != want:
                raise ValueError(f"--labelled (M2) takes {name} {want!r}, got {value!r}")
        if cfg.labelled < cfg.classes:
            raise ValueError(f"labelled must be at least one per class ({cfg.classes}), got {cfg.labelled}")
        if cfg.kl_warmup:
            raise ValueError(f"--labelled (M2) has no KL warm-up, got kl_warmup {cfg.kl_warmup}")
        if cfg.compile:
            raise ValueError("--labelled (M2) runs eagerly: --compile is not supported with it")

    def build(self, cfg, ds) -> SSVAE:
        """M2 over the data (a data set or the run's DataSpec) with the VAE's sizes and likelihood."""
        likelihood = LIKELIHOODS[cfg.likelihood](ds.x_dim)
        return SSVAE(
            ds.x_dim, cfg.classes, cfg.z_dim, tuple(cfg.hidden), aux_weight=cfg.aux_weight, likelihood=likelihood
        )

    def objective(self, cfg) -> SemiSupervisedLoss:
        return SemiSupervisedLoss()

    def prepare_data(self, cfg, ds: datasets.Dataset) -> datasets.Dataset:
        """``ds`` with all but ``cfg.labelled`` training labels hidden (-1):
        ``labelled // K`` per class, one more for the first ``labelled % K``
        classes, drawn by ``cfg.seed``."""
        y, k = ds.y_train, cfg.classes
        # a source without labels gives every example class 0
        if y is None or len(y) != len(ds.x_train) or len(y) == 0 or bool((y == y[0]).all()):
            raise ValueError(
                f"--labelled needs labelled data; data {cfg.data!r} has no labels (the named sets, image folders "
                "with class sub-folders, .npz files with a y array and IDX label files carry them)"
            )
        if y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(
                f"--labelled needs integer labels in [0, classes = {k}), got values in [{y.min()}, {y.max()}]"
            )
        if cfg.labelled > len(y):
            raise ValueError(f"labelled must be at most the training set's size ({len(y)}), got {cfg.labelled}")
        g = torch.Generator().manual_seed(cfg.seed)
        kept = []
        for c in range(k):
            members = torch.nonzero(y.cpu() == c)[:, 0]
            n = cfg.labelled // k + (c < cfg.labelled % k)
            if len(members) < n:
                raise ValueError(
                    f"labelled {cfg.labelled} needs {n} examples of class {c}, the data has {len(members)}"
                )
            kept.append(members[torch.randperm(len(members), generator=g)[:n]])
        kept = torch.cat(kept).to(y.device)
        hidden = torch.full_like(y, -1)
        hidden[kept] = y[kept]
        return dataclasses.replace(ds, y_train=hidden)

    def with_labels(self, cfg, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pack_labels(x, y.to(x.device))

    @torch.no_grad()
    def evaluate(self, cfg, m2: SSVAE, xy_test: torch.Tensor, batch_size: int = 500) -> dict:
        """On the test split, its labels unseen: the unlabelled bound U(x)'s
        named terms per image (``test_recon`` = sum_y q(y|x) E_q log p(x|y,z),
        ``test_kl_top`` = KL(q(y,z|x) || p(y,z)), ``test_elbo``, ``test_bpd``),
        each averaged over ``cfg.test_particles`` draws of z, and
        ``test_accuracy``, the share of test images whose argmax q_phi(y|x) is
        their label."""
        x_test, y_test = unpack_labels(xy_test)
        elbo = TraceAnalyticKL_ELBO(num_particles=cfg.test_particles, vectorize_particles=True, max_plate_nesting=1)
        recon = kl = 0.0
        for i in range(0, len(x_test), batch_size):
            terms = elbo.terms(m2.model, m2.guide, x_test[i : i + batch_size])
            recon += terms.pop("x")
            kl -= sum(terms.values())
        n = len(x_test)
        discrete = getattr(m2.likelihood, "discrete", False)
        metrics = prefixed(bound_terms(recon / n, kl / n, dim=m2.x_dim if discrete else None), "test")
        metrics["test_accuracy"] = m2.accuracy(x_test, y_test)
        return metrics

    def write_figures(self, out: str, cfg, m2: SSVAE, ds, xy_test: torch.Tensor) -> None:
        """None yet: the VAE's figures need a decoder of z alone."""
