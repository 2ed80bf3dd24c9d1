"""How ``pyrovae train vae`` builds, feeds, evaluates and draws a VAE (its recipe
for the shared loop in :mod:`pyrovae.train`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.cli import non_negative_int, positive_int
from pyrovae.config import TrainConfig, option, override
from pyrovae.evaluate.commands import add_evaluate_flags
from pyrovae.hvae import HVAE, active_units, check_prior
from pyrovae.infer import evaluate_iwae, make_elbo
from pyrovae.infer.bound import prefixed
from pyrovae.infer.elbos import ELBOS
from pyrovae.parts.encoders import GUIDES
from pyrovae.parts.likelihoods import LIKELIHOODS
from pyrovae.parts.priors import PRIORS
from pyrovae.recipes.base import Recipe
from pyrovae.recipes.conditional import num_classes
from pyrovae.registry import lookup
from pyrovae.vae import NETS, build_vae


@dataclass
class VAEConfig(TrainConfig):
    """``pyrovae train vae``: a VAE by SVI (the common fields' defaults as they are)."""

    model: str = override("model", "vae")
    binarize: str = option(
        "dynamic", "binarisation of pixel values for the Bernoulli likelihood", choices=datasets.BINARIZE
    )
    z_dim: int = option(50, "latent size", ge=1)
    hidden: list[int] = option([400], "hidden layer sizes of the encoder (the decoder mirrors them)", ge=1)
    elbo: str = option("analytic", "ELBO estimator", choices=ELBOS)
    kl_warmup: int = option(0, "KL weight rises linearly from 0 to 1 over this many epochs (0: no warm-up)", ge=0)
    prior: str = option("normal", "prior p(z) (conditional: p(z | y), learned; needs --conditional)", choices=PRIORS)
    guide: str = option("diag", "encoder q(z|x)", choices=GUIDES)
    likelihood: str = option("bernoulli", "p(x|z); only bernoulli binarises the data", choices=LIKELIHOODS)
    net: str = option("mlp", "encoder/decoder networks (conv needs image data)", choices=NETS)
    iwae_k: int = option(0, "IWAE-k log-likelihood on the test split after each evaluation (0: off)", ge=0)
    labelled: int | None = option(
        None,
        "train the semi-supervised VAE (M2) with this many labels, balanced over the classes (seeded)",
        ge=1,
    )
    aux_weight: float = option(46.0, "M2 (--labelled): weight alpha of the classification term alpha log q(y|x)", ge=0)
    classes: int = option(10, "M2 (--labelled): the number of classes K, labels in [0, K)", ge=2)


def check_kl_warmup(cfg) -> None:
    """KL warm-up weighs the KL by beta < 1 through the objective's
    ``kl_scale``: a ``ValueError`` for an ELBO that has none (and, where the
    model warms up by default, how to switch it off)."""
    if cfg.kl_warmup and not hasattr(make_elbo(cfg.elbo), "kl_scale"):
        message = f"kl_warmup needs an ELBO with a kl_scale (--elbo analytic), got elbo {cfg.elbo!r}"
        if next(f.default for f in dataclasses.fields(cfg) if f.name == "kl_warmup"):
            message += (
                f"; the {cfg.model.upper()} warms up by default (kl_warmup = {cfg.kl_warmup}): "
                f"add --kl-warmup 0 to train with {cfg.elbo!r}"
            )
        raise ValueError(message)


class VAERecipe(Recipe):
    per_layer = False  # the report of a one-layer model: no kl_1 or active units beside kl_top
    evaluate_help = "test ELBO (and IWAE-k log-likelihood) of a trained {model}"

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for VAE settings that cannot work."""
        if cfg.z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {cfg.z_dim}")
        if any(h < 1 for h in cfg.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {cfg.hidden}")
        lookup("binarize mode", cfg.binarize, datasets.BINARIZE)
        check_kl_warmup(cfg)
        for kind, name, registry in (
            ("prior", cfg.prior, PRIORS),
            ("guide", cfg.guide, GUIDES),
            ("likelihood", cfg.likelihood, LIKELIHOODS),
            ("net", self.net(cfg), NETS),
        ):
            lookup(kind, name, registry)
        check_prior(cfg.prior, "bottom-up", 1, getattr(cfg, "conditional", False))
        if cfg.iwae_k < 0:
            raise ValueError(f"iwae_k must be >= 0 (0: no IWAE estimate), got {cfg.iwae_k}")

    def build(self, cfg, ds: datasets.Dataset) -> HVAE:
        image_shape = ds.image_shape if ds.is_image else None
        return build_vae(
            ds.x_dim,
            cfg.z_dim,
            tuple(cfg.hidden),
            prior=cfg.prior,
            guide=cfg.guide,
            likelihood=cfg.likelihood,
            net=self.net(cfg),
            image_shape=image_shape,
            num_classes=num_classes(cfg, ds),
        )

    def objective(self, cfg):
        return make_elbo(cfg.elbo)

    def on_epoch_start(self, cfg, epoch: int, objective) -> None:
        """KL warm-up: the KL weight beta rises linearly from 0 at epoch 1 to 1
        at epoch ``cfg.kl_warmup + 1``; until then the objective is not a bound."""
        if cfg.kl_warmup:
            objective.kl_scale = min(1.0, (epoch - 1) / cfg.kl_warmup)

    @staticmethod
    def net(cfg) -> str:
        """The encoder/decoder family: ``auto`` (the shared default) is the MLP."""
        return "mlp" if cfg.net == "auto" else cfg.net

    @staticmethod
    def binarize_mode(cfg) -> str:
        """``cfg.binarize`` for a likelihood of binary data (Bernoulli); the grey
        levels as they are for the others (continuous Bernoulli, Gaussian, discretised)."""
        return cfg.binarize if LIKELIHOODS[cfg.likelihood].binary_data else "none"

    def check_data(self, cfg, x: torch.Tensor) -> None:
        """The training data against the likelihood's support, once before
        training: binarisation needs intensities in [0, 1], and each
        likelihood its own support (its distribution's ``support``)."""
        lo, hi = float(x.min()), float(x.max())
        mode = self.binarize_mode(cfg)
        if mode != "none" and (lo < 0 or hi > 1):
            raise ValueError(
                f"data {cfg.data!r} has values in [{lo:.3g}, {hi:.3g}], but the {cfg.likelihood} likelihood "
                f"binarises them (--binarize {mode}), which needs intensities in [0, 1]; for real-valued data use "
                "--likelihood gaussian"
            )
        if mode == "none":
            support = LIKELIHOODS[cfg.likelihood](x.shape[1])(torch.zeros(1, x.shape[1], device=x.device)).support
            if not support.check(x).all():
                base = getattr(support, "base_constraint", support)
                if LIKELIHOODS[cfg.likelihood].binary_data:
                    where, fix = (
                        "{0, 1}",
                        "binarise them (--binarize dynamic or threshold) or use a likelihood for grey levels "
                        "(--likelihood continuous-bernoulli)",
                    )
                else:
                    where, fix = (
                        (
                            f"[{base.lower_bound:g}, {base.upper_bound:g}]"
                            if hasattr(base, "lower_bound")
                            else str(base)
                        ),
                        "for real-valued data use --likelihood gaussian",
                    )
                raise ValueError(
                    f"data {cfg.data!r} has values in [{lo:.3g}, {hi:.3g}] that lie outside {where}, the support of "
                    f"the {cfg.likelihood} likelihood; {fix}"
                )

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return datasets.binarize(x, self.binarize_mode(cfg))

    def prepare_test(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return datasets.binarize_test(x, self.binarize_mode(cfg))

    @torch.no_grad()
    def evaluate(self, cfg, vae: HVAE, x_test: torch.Tensor, batch_size: int = 500, y=None) -> dict:
        """The bound's named terms (:meth:`HVAE.bound <pyrovae.hvae.HVAE.bound>`)
        per test image, in nats: ``test_recon`` = E_q[log p(x|z_1)],
        ``test_kl_top`` = KL(q(z_L|.) || p(z_L)) (z is the VAE's top and only
        layer), ``test_kl_layers`` for more than one layer, ``test_elbo`` and,
        for a likelihood that is a probability mass function (Bernoulli,
        discretised), ``test_bpd``; each image's averaged over
        ``cfg.test_particles`` draws (vectorised). With :attr:`per_layer`, each
        layer's ``test_kl_l`` and active units ``test_active_l``
        (:func:`~pyrovae.hvae.active_units`). With ``cfg.iwae_k > 0`` also the
        IWAE-k estimate of log p(x) (``test_iwae`` in nats per image,
        ``test_iwae_bpd`` in bits per dimension; of log p(x | y) given ``y``). Whatever ELBO trains the
        model, these use the analytic-KL estimator: the same expectation, with
        the KL exact wherever it is registered and Monte Carlo elsewhere."""
        terms = vae.bound(x_test, cfg.test_particles, batch_size, y=y).summary()  # given y: of log p(x | y)
        if not self.per_layer:
            terms = {name: value for name, value in terms.items() if not name.startswith("kl_") or name == "kl_top"}
        metrics = prefixed(terms, "test")
        if self.per_layer:
            metrics.update({f"test_active_{l}": float(n) for l, n in active_units(vae, x_test, y=y).items()})
        if cfg.iwae_k > 0:
            iwae = evaluate_iwae(vae.model, vae.guide, x_test, cfg.iwae_k, y=y)
            metrics.update(test_iwae=iwae["iwae"], test_iwae_bpd=iwae["iwae_bpd"])
        return metrics

    def write_figures(self, out: str, cfg, vae: HVAE, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        if not ds.is_image:
            return
        plots.save_image_grid(
            os.path.join(out, "samples.png"), vae.sample(64), ds.image_shape, 8, "samples E[x|z], z ~ p(z)"
        )
        x = x_test[:32]
        pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(2 * len(x), -1)
        plots.save_image_grid(
            os.path.join(out, "reconstructions.png"), pairs, ds.image_shape, 8, "test image | reconstruction"
        )

    def add_evaluate_arguments(self, parser) -> None:
        parser.add_argument(
            "--test-particles",
            type=positive_int,
            default=None,
            help="particles for the test ELBO (default: the run's)",
        )
        parser.add_argument(
            "--iwae-k",
            type=non_negative_int,
            default=None,
            help="IWAE-k estimate of log p(x) with k importance samples (default: the run's; 0 off)",
        )
        add_evaluate_flags(parser, diffusion=False)

    def run_evaluate(self, args, model, cfg, x_test: torch.Tensor) -> dict:
        """:meth:`evaluate` with the run's ``test_particles`` and ``iwae_k``, or the flags' values."""
        overrides = {k: getattr(args, k) for k in ("test_particles", "iwae_k") if getattr(args, k) is not None}
        return self.evaluate(dataclasses.replace(cfg, **overrides), model, x_test)
