"""The ELBO with closed-form KL terms wherever they exist.

For a model p(x, z) and a guide q(z|x) the ELBO is

    ELBO(x) = E_q[log p(x|z)] + sum_i E_q[log p(z_i|pa_p(z_i)) - log q(z_i|pa_q(z_i)))].

When ``torch.distributions.kl_divergence(q(z_i|.), p(z_i|.))`` is registered
(Normal/Normal, Independent Normal, MultivariateNormal, LowRankMultivariateNormal,
...), the inner expectation over z_i is done exactly and only the rest is sampled:

    ELBO(x) = E_q[log p(x|z)] - sum_i E_q[KL(q(z_i|.) || p(z_i|.))],

which for the VAE is the seed's E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z)).
"""

from __future__ import annotations

import warnings

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.inspect import get_dependencies
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, warn_if_nan
from torch.distributions import kl_divergence


class TraceAnalyticKL_ELBO(ELBO):
    r"""An ELBO estimator that uses analytic KL divergences where they are
    registered and Monte Carlo everywhere else; no restriction to mean-field
    guides or to Normal distributions.

    Per particle z ~ q it sums, over the sample sites of the model and guide:

    - an observed site x: log p(x | z) (Monte Carlo, as in ``Trace_ELBO``);
    - a latent site z_i in both: ``-KL(q(z_i|.) || p(z_i|.))`` when
      ``kl_divergence(guide_fn, model_fn)`` is registered, the two sites have the
      same batch shape and the same scale and mask; otherwise the Monte Carlo
      term ``log p(z_i|.) - log q(z_i|.)`` at the sampled z_i;
    - an auxiliary guide-only site: ``-log q``.

    Every term is scaled and masked exactly as ``Trace_ELBO`` scales and masks
    a log-density (``pyro.plate(..., subsample_size=...)``, ``poutine.scale``,
    ``poutine.mask``), so the estimate has the same expectation as
    ``Trace_ELBO``'s and often, though not always, a lower variance: at a guide
    equal to the exact posterior ``Trace_ELBO``'s estimate is the constant
    log p(x) while the KL form still samples E_q log p(x|z).

    **When the substitution is unbiased.** Replacing
    E_q[log p(z_i|pa_p) - log q(z_i|pa_q)] by -E_q[KL(q(z_i|pa_q) || p(z_i|pa_p))]
    integrates z_i out conditionally on pa_p and pa_q; that is exact only when
    q(z_i | pa_p, pa_q) = q(z_i | pa_q), i.e. when no parent of z_i in the model
    is a descendant of z_i in the guide. It always holds when the model and
    guide sample their shared latents in the same order (then every model
    parent of z_i is sampled before z_i in the guide). With
    ``pyro.enable_validation()`` this class checks that order for every site
    where it uses the closed form; if the order differs it works out the
    dependencies of both programs (``pyro.infer.inspect.get_dependencies``),
    raises ``ValueError`` if the condition fails and stays silent if it holds;
    if the dependencies cannot be worked out it warns.

    Guide sites must be reparameterised (``has_rsample``): the gradient of
    E_q[log p(x|z)] reaches the guide through z. For discrete latents use
    ``Trace_ELBO`` or ``TraceGraph_ELBO``.

    :param float kl_scale: beta >= 0, the weight of the latent terms (KL or
        their Monte Carlo stand-ins); the objective is
        E_q[log p(x|z)] - beta * KL. Only beta = 1 gives the ELBO, a lower bound
        on log p(x); other values are for KL annealing and beta-VAEs.
        :meth:`terms` always reports the unweighted terms.
    :param kwargs: ``num_particles``, ``vectorize_particles``,
        ``max_plate_nesting``, ``retain_graph`` as for :class:`pyro.infer.ELBO`.

    References: Kingma & Welling (2014), Auto-Encoding Variational Bayes,
    appendix B; Pyro's ``TraceMeanField_ELBO`` for the dependency condition.
    """

    def __init__(self, kl_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.kl_scale = kl_scale
        # (model, guide) pairs whose dependency structure has been checked.
        self._checked_pairs: set = set()

    @property
    def kl_scale(self) -> float:
        return self._kl_scale

    @kl_scale.setter
    def kl_scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"kl_scale must be a number >= 0, got {value!r}")
        self._kl_scale = float(value)

    def _get_trace(self, model, guide, args, kwargs):
        """One guide trace and the model replayed against it. Unlike
        ``Trace_ELBO`` no log-densities are computed here: the terms compute
        only the ones they need."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def _particle_terms(self, model_trace, guide_trace):
        """The ELBO of one particle as ``(observed, latent, analytic)``: dicts
        site name -> scalar tensor (log-likelihoods; minus KLs or their Monte
        Carlo estimates) and the list of sites that used a closed-form KL."""
        observed, latent, analytic = {}, {}, []
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                observed[name] = _log_prob_sum(site)
                continue
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None:
                # A model latent without a guide site is sampled from its prior,
                # as in Trace_ELBO (check_model_guide_match warns about it).
                latent[name] = _log_prob_sum(site)
                continue
            if not guide_site["fn"].has_rsample:
                raise ValueError(
                    f"guide site {name!r} must be reparameterised (has_rsample) for TraceAnalyticKL_ELBO, "
                    f"got {type(guide_site['fn']).__name__}; use Trace_ELBO or TraceGraph_ELBO for it"
                )
            kl = _scaled_kl(guide_site, site)
            if kl is None:
                latent[name] = _log_prob_sum(site) - _log_prob_sum(guide_site)
            else:
                latent[name] = -kl
                analytic.append(name)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in model_trace.nodes:
                latent[name] = -_log_prob_sum(site)
        return observed, latent, analytic

    def _terms(self, model, guide, args, kwargs):
        """Per-site terms averaged over ``num_particles``: ``(observed, latent)``."""
        observed, latent = {}, {}
        for i, (model_trace, guide_trace) in enumerate(self._get_traces(model, guide, args, kwargs)):
            obs_i, lat_i, analytic = self._particle_terms(model_trace, guide_trace)
            if i == 0 and is_validation_enabled():
                self._check_dependencies(model, guide, args, kwargs, model_trace, guide_trace, analytic)
            for total, terms in ((observed, obs_i), (latent, lat_i)):
                for name, value in terms.items():
                    total[name] = total.get(name, 0.0) + value / self.num_particles
        return observed, latent

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-(sum of log-likelihood terms + kl_scale * sum of latent terms), a
        differentiable tensor: the surrogate and the loss are the same number
        because every guide site is reparameterised."""
        observed, latent = self._terms(model, guide, args, kwargs)
        return -(sum(observed.values()) + self.kl_scale * sum(latent.values()))

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss (minus the ELBO when kl_scale is 1) as a float, no gradients."""
        with torch.no_grad():
            return warn_if_nan(torch_item(self.differentiable_loss(model, guide, *args, **kwargs)), "loss")

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float; its gradient is accumulated into the parameters.
        NaN is checked on the float, not on the tensor, to add no device sync
        or backward hook to a training step."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        return warn_if_nan(torch_item(loss), "loss")

    def terms(self, model, guide, *args, **kwargs) -> dict:
        """The ELBO estimate split by site: ``{site name: float}`` with the
        expected log-likelihood estimate for each observed site and -KL (or its
        Monte Carlo estimate log p - log q) for each latent site, each averaged
        over ``num_particles``. The values sum to the ELBO estimate, whatever
        ``kl_scale`` is; the loss is ``-(sum observed + kl_scale * sum latent)``."""
        with torch.no_grad():
            observed, latent = self._terms(model, guide, args, kwargs)
        return {name: torch_item(value) for name, value in {**observed, **latent}.items()}

    def _check_dependencies(self, model, guide, args, kwargs, model_trace, guide_trace, analytic) -> None:
        """Raise ``ValueError`` if a closed-form KL site has a model parent
        that the guide samples after it (see the class docstring)."""
        suspects = _out_of_order(model_trace, guide_trace, analytic)
        if not suspects or (model, guide) in self._checked_pairs:
            return
        try:
            model_parents = get_dependencies(model, args, kwargs)["prior_dependencies"]
            guide_parents = get_dependencies(guide, args, kwargs)["prior_dependencies"]
        except Exception as err:  # provenance tracking cannot follow every program
            warnings.warn(
                f"TraceAnalyticKL_ELBO could not verify its dependency condition ({err}); model parents of "
                f"{suspects} are sampled after them in the guide, so the closed-form KL may be biased there"
            )
            return
        for name in suspects:
            parents = set(model_parents.get(name, {})) - {name}
            later = _descendants(guide_parents, name) & parents
            if later:
                raise ValueError(
                    f"site {name!r}: its model distribution depends on {sorted(later)}, which the guide samples "
                    f"after {name!r} and from it, so KL(q || p) at {name!r} is not an unbiased stand-in for "
                    "log p - log q; sample the sites in the same order in model and guide or use Trace_ELBO"
                )
        self._checked_pairs.add((model, guide))


def _log_prob_sum(site) -> torch.Tensor:
    """The site's log-density at its value, scaled and masked as Trace_ELBO
    does, summed to a scalar."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()


def _same(a, b) -> bool:
    """Equal scales or masks. The identity test settles the usual case (one
    handler around both programs) without comparing tensor values."""
    if a is b:
        return True
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def _scaled_kl(guide_site, model_site):
    """The scaled, masked KL(q || p) summed to a scalar, or None when it is not
    registered or the sites differ in shape, scale or mask (then only the Monte
    Carlo term reproduces Trace_ELBO's expectation)."""
    q, p = guide_site["fn"], model_site["fn"]
    if q.batch_shape != p.batch_shape or q.event_shape != p.event_shape:
        return None
    if not (_same(guide_site["scale"], model_site["scale"]) and _same(guide_site["mask"], model_site["mask"])):
        return None
    try:
        kl = kl_divergence(q, p)
    except NotImplementedError:
        return None
    return scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).expand(q.batch_shape).sum()


def _latent_order(trace, other) -> list:
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and name in other.nodes and not site["is_observed"]]


def _out_of_order(model_trace, guide_trace, analytic) -> list:
    """Closed-form sites z with a site sampled before z in the model but after z
    in the guide: only there can the dependency condition fail."""
    model_order = _latent_order(model_trace, guide_trace)
    guide_position = {name: i for i, name in enumerate(_latent_order(guide_trace, model_trace))}
    suspects = []
    for name in analytic:
        before = model_order[: model_order.index(name)]
        if any(guide_position[other] > guide_position[name] for other in before):
            suspects.append(name)
    return suspects


def _descendants(parents: dict, name: str) -> set:
    """Sites downstream of ``name`` in a ``prior_dependencies`` map."""
    found, frontier = set(), {name}
    while frontier:
        frontier = {child for child, ups in parents.items() if child not in found and frontier & (set(ups) - {child})}
        found |= frontier
    return found
