"""The ELBO with closed-form KL terms wherever they are exact.

For a model p(x, z) and a guide q(z|x) the ELBO is

    ELBO(x) = E_q[log p(x|z)] + sum_i E_q[log p(z_i|pa_p(z_i)) - log q(z_i|pa_q(z_i)))].

When ``torch.distributions.kl_divergence(q(z_i|.), p(z_i|.))`` is registered
(Normal/Normal, Independent Normal, MultivariateNormal, LowRankMultivariateNormal,
...), the inner expectation over z_i is done exactly and only the rest is sampled:

    ELBO(x) = E_q[log p(x|z)] - sum_i E_q[KL(q(z_i|.) || p(z_i|.))],

which for the VAE is the seed's E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z)).
The substitution is exact only under a dependency condition (see
:class:`TraceAnalyticKL_ELBO`); where it fails the Monte Carlo term is kept.

A discrete guide site y marked for parallel enumeration (``config_enumerate``)
is summed over its support instead of sampled: every term below y is computed
in each branch and weighted by q(y|.), so that for the semi-supervised VAE

    U(x) = sum_y q_phi(y|x) [E_q log p_theta(x|y,z) - KL(q_phi(z|x,y) || p(z)) + log p(y)] + H(q_phi(y|x)).
"""

from __future__ import annotations

import contextlib
import warnings

import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO
from pyro.infer.inspect import get_dependencies
from pyro.infer.util import MultiFrameTensor, is_validation_enabled, torch_item
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match, warn_if_nan
from torch.distributions import kl_divergence


class Terms(dict):
    """``{site name: float}``, the ELBO estimate split by site, with
    ``closed_form``: the latent sites whose term was the exact -KL (in every
    branch, below an enumerated site), and ``enumerated``: the guide sites
    summed over their support, whose term sum_y q(y|.) [log p(y|.) - log q(y|.)]
    = -KL(q(y|.) || p(y|.)) is exact too (every other latent site's term is
    the Monte Carlo log p - log q)."""

    def __init__(self, values: dict, closed_form: tuple, enumerated: tuple = ()):
        super().__init__(values)
        self.closed_form = closed_form
        self.enumerated = enumerated


class TraceAnalyticKL_ELBO(ELBO):
    r"""An ELBO estimator that uses analytic KL divergences where they are
    registered and exact, and Monte Carlo everywhere else; a drop-in for
    ``Trace_ELBO`` on any model/guide pair it accepts, with the same expectation
    of the loss and of the gradient.

    Per particle z ~ q it sums, over the sample sites of the model and guide:

    - an observed site x: log p(x | z) (Monte Carlo, as in ``Trace_ELBO``);
    - a latent site z_i in both programs: ``-KL(q(z_i|.) || p(z_i|.))`` when the
      guide site is reparameterised, ``kl_divergence(guide_fn, model_fn)`` is
      registered, the two sites have the same shapes, scale and mask, and the
      dependency condition below holds; otherwise the Monte Carlo term
      ``log p(z_i|.) - log q(z_i|.)`` at the sampled z_i;
    - an auxiliary guide-only site: ``-log q``.

    Every term is scaled and masked exactly as ``Trace_ELBO`` scales and masks
    a log-density (``pyro.plate(..., subsample_size=...)``, ``poutine.scale``,
    ``poutine.mask``, ``Distribution.mask``).

    **Discrete (non-reparameterised) guide sites** get ``Trace_ELBO``'s
    score-function surrogate: log q(z_i) times the detached log-weight r (the
    sum of every site's term above, the closed-form ones included, weighted as
    the loss weights them), summed per index along z_i's own plates
    (``r.sum_to(site["cond_indep_stack"])``), so each subsampled data point's
    discrete latent is credited with its own terms only. Replacing a term of
    r by its conditional expectation (a KL) keeps the gradient unbiased and
    usually lowers its variance.

    **Enumerated discrete guide sites** (marked ``infer={"enumerate":
    "parallel"}``, as :func:`pyro.infer.config_enumerate` marks them) are not
    sampled: the guide runs under :class:`~pyro.poutine.enum_messenger.EnumMessenger`,
    so y takes every value of its support at once along a dimension of its own
    (left of the ``max_plate_nesting`` plate dimensions, which are guessed once
    when not given), and every site below y is computed in each branch. Each
    term T is then replaced by its exact expectation over the enumerated sites
    it depends on, sum_y q(y|.) T(y) (with their guide ancestors: the product
    of their probabilities q, unscaled and unmasked, as ``TraceEnum_ELBO``'s
    weights); y's own term becomes sum_y q(y|.) [log p(y|.) - log q(y|.)] =
    -KL(q(y|.) || p(y|.)), exact whatever depends on what, and a Gaussian KL
    below y is taken in closed form in each branch under the rule below. For
    the semi-supervised VAE this is

        U(x) = sum_y q_phi(y|x) [E_q log p_theta(x|y,z) - KL(q_phi(z|x,y) || p(z)) + log p(y)] + H(q_phi(y|x)),

    ``TraceEnum_ELBO``'s expectation (guide-side enumeration) without the
    Monte Carlo noise of its KL terms. It refuses, with a ``ValueError``
    naming the site and suggesting ``TraceEnum_ELBO``, what it cannot sum
    exactly: sequential enumeration and ``num_samples`` (multi-sample)
    enumeration, a site enumerated in the model but absent from the guide, a
    site outside a plate whose term depends on a site enumerated inside it,
    and a non-reparameterised site left to the score function below an
    enumerated site.

    **When the closed form is exact.** Replacing
    E_q[log p(z_i|pa_p) - log q(z_i|pa_q)] by -E_q[KL(q(z_i|pa_q) || p(z_i|pa_p))]
    integrates z_i out conditionally on pa_p and pa_q; that is exact only when
    q(z_i | pa_p, pa_q) = q(z_i | pa_q), i.e. when no model parent of z_i is a
    descendant of z_i in the guide. It always holds when model and guide sample
    their shared latents in the same order. Once per (model, guide) pair this
    class looks for sites that have a site sampled before them in the model but
    after them in the guide; only there can the condition fail. For those it
    works out the dependencies of both programs
    (``pyro.infer.inspect.get_dependencies``) and uses Monte Carlo at every
    site where the condition fails, or at every such site if the dependencies
    cannot be worked out; it warns once, naming them. The decision is cached
    and does not depend on ``pyro.enable_validation``: the estimate is
    unbiased whether validation is on or off. (A bottom-up hierarchical
    encoder, or the diffusion chain's ``guide_forward``, is the typical case:
    the model's parent z_{l+1} of z_l is drawn after z_l and from it.)

    :param float kl_scale: beta >= 0, the weight of the latent terms (KL or
        their Monte Carlo stand-ins); the objective is
        E_q[log p(x|z)] - beta * KL. Only beta = 1 gives the ELBO, a lower bound
        on log p(x); other values are for KL annealing and beta-VAEs.
        :meth:`terms` always reports the unweighted terms.
    :param kwargs: ``num_particles``, ``vectorize_particles``,
        ``max_plate_nesting``, ``retain_graph`` as for :class:`pyro.infer.ELBO`.

    References: Kingma & Welling (2014), Auto-Encoding Variational Bayes,
    appendix B; Pyro's ``TraceMeanField_ELBO`` for the dependency condition and
    ``Trace_ELBO`` for the score-function surrogate.
    """

    # its loss is a function of the parameters, the batch and the random draws
    # alone, split linearly in kl_scale (loss_parts): pyrovae.compiled may capture it
    capturable = True

    def __init__(self, kl_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.kl_scale = kl_scale
        # (model, guide) -> the sites where the closed form would be biased.
        self._monte_carlo_sites: dict = {}

    @property
    def kl_scale(self) -> float:
        return self._kl_scale

    @kl_scale.setter
    def kl_scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"kl_scale must be a number >= 0, got {value!r}")
        self._kl_scale = float(value)

    def _get_traces(self, model, guide, args, kwargs):
        """``ELBO._get_traces`` with the guide run under :class:`_GuideEnum`:
        parallel enumeration of the sites marked for it, its dimensions left of
        the plates and of the particle plate. Without ``max_plate_nesting`` a
        guide that marks a site is run again once the nesting is guessed (on
        the first call only: the guess is kept)."""
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model, guide = self._vectorized_num_particles(model), self._vectorized_num_particles(guide)
        for _ in range(1 if self.vectorize_particles else self.num_particles):
            try:
                yield self._get_trace(model, _GuideEnum(self.max_plate_nesting)(guide), args, kwargs)
            except _NestingUnknown:
                self._guess_max_plate_nesting(model, guide, args, kwargs)
                yield self._get_trace(model, _GuideEnum(self.max_plate_nesting)(guide), args, kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        """One guide trace and the model replayed against it. Unlike
        ``Trace_ELBO`` no log-densities are computed here: the terms compute
        only the ones they need."""
        guide_trace = _run_traced(guide, args, kwargs)
        model_trace = _run_traced(model, args, kwargs, replay=guide_trace)
        for name, site in model_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and site["infer"].get("enumerate") is not None
                and name not in guide_trace.nodes
                and not site_is_subsample(site)
            ):
                raise ValueError(
                    f"TraceAnalyticKL_ELBO enumerates guide sites only; site {name!r} is marked for enumeration in "
                    "the model and is absent from the guide: use TraceEnum_ELBO, which enumerates the model"
                )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        # get_trace returned copies of their own: the plates' subsample sites are
        # removed in place (prune_subsample_sites would copy each trace again)
        return _prune_subsample_sites(model_trace), _prune_subsample_sites(guide_trace)

    def _particle_terms(self, model_trace, guide_trace, monte_carlo: frozenset):
        """One particle: ``(observed, latent, closed_form, score)``.
        ``observed`` and ``latent`` map site name -> (plates, per-index tensor):
        the scaled, masked log-likelihood, and -KL or its Monte Carlo stand-in,
        each the expectation over the enumerated sites it depends on (the
        summed dimensions kept, of size 1); ``closed_form`` lists the sites
        that took the KL; ``score`` lists the guide sites that
        need the score-function surrogate. Their log q is detached in the
        terms: its gradient comes from the surrogate instead, as in ``Trace_ELBO``."""
        enum = _enumerated(guide_trace)
        enum_dims = {info.dim for info in enum.values()}
        observed, latent, closed_form, score = {}, {}, [], []
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            plates = site["cond_indep_stack"]
            if site["is_observed"]:
                observed[name] = (plates, _log_prob(site))
                continue
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None:
                # A model latent without a guide site is sampled from its prior,
                # as in Trace_ELBO (check_model_guide_match warns about it).
                latent[name] = (plates, _log_prob(site))
                continue
            if name in enum:
                # log p - log q in every branch, weighted by q below: the exact -KL
                latent[name] = (plates, _log_prob(site) - _log_prob(guide_site))
                continue
            reparameterised = guide_site["fn"].has_rsample
            kl = _scaled_kl(guide_site, site, enum_dims) if reparameterised and name not in monte_carlo else None
            if kl is not None:
                latent[name] = (plates, -kl)
                closed_form.append(name)
                continue
            log_q = _log_prob(guide_site)
            if not reparameterised:
                score.append(guide_site)
                log_q = log_q.detach()
            latent[name] = (plates, _log_prob(site) - log_q)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in model_trace.nodes:
                log_q = _log_prob(site)
                if not site["fn"].has_rsample and name not in enum:
                    score.append(site)
                    log_q = log_q.detach()
                latent[name] = (site["cond_indep_stack"], -log_q)
        if enum:
            observed, latent = _expectations(observed, enum), _expectations(latent, enum)
            for site in score:
                above = _closure(site["fn"].log_prob(site["value"]), enum)
                if above:
                    raise ValueError(
                        f"TraceAnalyticKL_ELBO: the non-reparameterised guide site {site['name']!r} is sampled in "
                        f"each branch of the enumerated site(s) {sorted(above)}, where a score-function term is not "
                        "supported; mark it for parallel enumeration too (config_enumerate) or use TraceEnum_ELBO"
                    )
        return observed, latent, closed_form, score

    def _surrogate(self, observed: dict, latent: dict, score: list) -> tuple:
        """The score-function surrogate split as ``(s_obs, s_lat)``, the whole
        being ``s_obs + kl_scale * s_lat``: sum over the score sites of
        (r summed to the site's plates) * log q, r the detached per-index
        log-weight of the objective (``Trace_ELBO``'s ``log_r.sum_to(...)``),
        with r's observed and latent parts apart. Zero value, the
        score-function gradient; ``(0.0, 0.0)`` without score sites."""
        if not score:
            return 0.0, 0.0
        log_rs = [MultiFrameTensor(*terms.values()) for terms in (observed, latent)]
        parts = [0.0, 0.0]
        for site in score:
            # the unscaled log q, as Trace_ELBO's score_function term: r carries the scale
            log_q = site["fn"].log_prob(site["value"])
            for i, log_r in enumerate(log_rs):
                r = log_r.sum_to(site["cond_indep_stack"])
                if torch.is_tensor(r):
                    weighted = (r.detach() * log_q).sum()
                    parts[i] = parts[i] + weighted - weighted.detach()
        return tuple(parts)

    def _terms(self, model, guide, args, kwargs):
        """Per-site scalar terms averaged over ``num_particles``:
        ``(observed, latent, closed_form, enumerated, surrogate)``, ``surrogate``
        the pair ``(s_obs, s_lat)`` of zero-valued tensors carrying the
        score-function gradients (:meth:`_surrogate`)."""
        observed, latent, surrogate, closed_form, enumerated = {}, {}, (0.0, 0.0), (), ()
        k = self.num_particles
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            monte_carlo = self._biased_sites(model, guide, args, kwargs, model_trace, guide_trace)
            obs_i, lat_i, closed_form, score = self._particle_terms(model_trace, guide_trace, monte_carlo)
            enumerated = _enumerated_names(guide_trace)
            if score:
                surrogate = tuple(
                    total + part / k for total, part in zip(surrogate, self._surrogate(obs_i, lat_i, score))
                )
            for total, terms in ((observed, obs_i), (latent, lat_i)):
                for name, (_, value) in terms.items():
                    # one particle (the usual step): the sum alone, no division by 1 nor addition to 0
                    term = value.sum() if k == 1 else value.sum() / k
                    total[name] = total[name] + term if name in total else term
        return observed, latent, tuple(closed_form), enumerated, surrogate

    def loss_parts(self, model, guide, *args, **kwargs) -> tuple:
        """``(a, b)`` with loss = -(a + kl_scale * b): ``a`` the log-likelihood
        terms, ``b`` the latent terms (-KL or its Monte Carlo stand-in), each
        with its share of the score-function surrogate (zero-valued, it
        carries the gradient). The loss is linear in ``kl_scale``, so a
        captured loss (:mod:`pyrovae.compiled`) records these two sums once,
        and a KL warm-up that changes ``kl_scale`` every epoch needs no new
        capture; :meth:`loss_from_parts` combines them."""
        observed, latent, _, _, (s_obs, s_lat) = self._terms(model, guide, args, kwargs)
        a, b = _total(observed.values()), _total(latent.values())
        if not (isinstance(s_obs, float) and s_obs == 0.0):
            a = a + s_obs
        if not (isinstance(s_lat, float) and s_lat == 0.0):
            b = b + s_lat
        return a, b

    def capture_key(self) -> tuple:
        """The settings a captured loss bakes in (:mod:`pyrovae.compiled` keys
        its graphs on them); ``kl_scale`` is not one (:meth:`loss_parts`)."""
        return (self.num_particles, self.vectorize_particles, self.max_plate_nesting)

    def loss_from_parts(self, parts: tuple) -> torch.Tensor:
        """-(a + kl_scale * b) for ``parts = (a, b)`` from :meth:`loss_parts`."""
        a, b = parts
        return -(a + b) if self.kl_scale == 1.0 else -(a + self.kl_scale * b)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-(sum of log-likelihood terms + kl_scale * sum of latent terms), a
        differentiable tensor whose gradient is unbiased (through the samples of
        reparameterised sites, the score function at the others)."""
        return self.loss_from_parts(self.loss_parts(model, guide, *args, **kwargs))

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

    def terms(self, model, guide, *args, **kwargs) -> Terms:
        """The ELBO estimate split by site: a :class:`Terms` dict ``{site name:
        float}`` with the expected log-likelihood estimate for each observed
        site and -KL (or its Monte Carlo estimate log p - log q) for each latent
        site, each averaged over ``num_particles``, ``.closed_form``, the sites
        that took the exact KL, and ``.enumerated``, the sites summed over their
        support (their term the exact -KL). The values sum to the ELBO estimate,
        whatever ``kl_scale`` is; the loss is ``-(sum observed + kl_scale * sum latent)``."""
        with torch.no_grad():
            observed, latent, closed_form, enumerated, _ = self._terms(model, guide, args, kwargs)
        values = {name: torch_item(value) for name, value in {**observed, **latent}.items()}
        return Terms(values, closed_form, enumerated)

    def per_example_terms(self, model, guide, x: torch.Tensor, *args, **kwargs) -> tuple[dict, tuple]:
        """The terms of :meth:`terms` per example: ``({site: (B,) tensor},
        closed_form)``, the expected log-likelihood of each observed site and
        -KL (or its Monte Carlo estimate log p - log q) of each latent site,
        averaged over ``num_particles``; summed over the examples they are
        :meth:`terms`. The examples are the data plate's, the last batch
        dimension of every site (``x.shape[0]`` of them); ``model`` and
        ``guide`` are called with ``(x, *args, **kwargs)``."""
        totals, closed_form, args = {}, (), (x, *args)
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            monte_carlo = self._biased_sites(model, guide, args, kwargs, model_trace, guide_trace)
            observed, latent, closed_form, _ = self._particle_terms(model_trace, guide_trace, monte_carlo)
            for name, (_, value) in {**observed, **latent}.items():
                term = value.reshape(-1, x.shape[0]).sum(0) / self.num_particles
                totals[name] = totals[name] + term if name in totals else term
        return totals, tuple(closed_form)

    def _biased_sites(self, model, guide, args, kwargs, model_trace, guide_trace) -> frozenset:
        """The sites where the closed-form KL would be biased (a model parent
        that the guide samples after the site and from it), worked out on the
        first call for this (model, guide) pair and cached; warns once if any."""
        key = (model, guide)
        if key in self._monte_carlo_sites:
            return self._monte_carlo_sites[key]
        suspects = _out_of_order(model_trace, guide_trace)
        biased, reason = suspects, None
        if suspects:
            try:
                # an extra run of each program: outer handlers (a replay, say) must not steer it
                with poutine.block():
                    model_parents = get_dependencies(model, args, kwargs)["prior_dependencies"]
                    guide_parents = get_dependencies(guide, args, kwargs)["prior_dependencies"]
            except Exception as err:  # provenance tracking cannot follow every program
                reason = f"their dependencies could not be worked out ({type(err).__name__}: {err})"
            else:
                biased = [
                    name
                    for name in suspects
                    if _descendants(guide_parents, name) & (set(model_parents.get(name, {})) - {name})
                ]
                reason = "the model conditions each on a site that the guide samples after it, from it"
        self._monte_carlo_sites[key] = frozenset(biased)
        if biased:
            in_guide_order = sorted(biased, key=_latent_order(guide_trace, model_trace).index)
            warnings.warn(
                f"TraceAnalyticKL_ELBO: the closed-form KL would be biased at sites {in_guide_order} ({reason}); "
                "using the Monte Carlo term log p - log q there and the closed form elsewhere. Sampling the "
                "guide in the model's order (a top-down encoder) makes every KL exact",
                stacklevel=4,
            )
        return self._monte_carlo_sites[key]


class _NestingUnknown(Exception):
    """A site is marked for parallel enumeration and ``max_plate_nesting`` is not known yet."""


class _GuideEnum(EnumMessenger):
    """Pyro's parallel enumeration of the guide's marked sites, its
    dimensions from ``-1 - max_plate_nesting`` leftwards; the markers that
    cannot be summed exactly here raise a ``ValueError`` naming the site.
    Until the first marked site (in a guide without one: always) the sites
    pass untouched, without the enumerator's bookkeeping."""

    def __init__(self, max_plate_nesting):
        finite = max_plate_nesting != float("inf")
        super().__init__(first_available_dim=-1 - max_plate_nesting if finite else None)
        self._active = False

    def __enter__(self):
        self._active = False
        return super().__enter__()

    def _pyro_sample(self, msg) -> None:
        how = msg["infer"].get("enumerate")
        if how is not None and not msg["is_observed"] and not msg["done"]:
            num_samples = msg["infer"].get("num_samples")
            if how != "parallel" or num_samples is not None:
                given = f"num_samples={num_samples}" if how == "parallel" else repr(how)
                raise ValueError(
                    "TraceAnalyticKL_ELBO sums a guide site over its support only under parallel enumeration "
                    f'(infer={{"enumerate": "parallel"}}, without num_samples); site {msg["name"]!r} asks for '
                    f"{given}: use TraceEnum_ELBO for it"
                )
            if self.first_available_dim is None:
                raise _NestingUnknown
            self._active = True
        elif msg["infer"].get("_markov_scope") is not None:
            self._active = True  # pyro.markov: the enumerator tracks every site's depth
        if self._active:
            super()._pyro_sample(msg)

    def _pyro_post_sample(self, msg) -> None:
        if self._active:
            super()._pyro_post_sample(msg)


def _run_traced(fn, args, kwargs, replay=None):
    """The trace of one run of ``fn`` (replayed against ``replay``), as
    ``poutine.trace(poutine.replay(fn, trace=replay)).get_trace(*args, **kwargs)``
    records its sample sites, without the handler objects, the ``_INPUT`` and
    ``_RETURN`` nodes and the copy that ``get_trace`` makes of a trace no one
    else holds. An error names the shapes of the sites so far, as Pyro's does."""
    messenger = TraceMessenger()
    with messenger, poutine.replay(trace=replay) if replay is not None else contextlib.nullcontext():
        try:
            fn(*args, **kwargs)
        except (ValueError, RuntimeError) as err:
            raise type(err)(f"{err}\n{messenger.trace.format_shapes()}").with_traceback(err.__traceback__) from err
    return messenger.trace


def _total(values):
    """``sum(values)`` without the leading ``0 +`` (one tensor op fewer per call); 0.0 when empty."""
    total = 0.0
    for i, value in enumerate(values):
        total = value if i == 0 else total + value
    return total


def _prune_subsample_sites(trace):
    """``trace`` without its plates' subsample sites, removed in place
    (:func:`pyro.poutine.util.prune_subsample_sites` on a trace of our own)."""
    for name in [name for name, site in trace.nodes.items() if site_is_subsample(site)]:
        trace.remove_node(name)
    return trace


def _log_prob(site) -> torch.Tensor:
    """The site's log-density at its value, scaled and masked as Trace_ELBO does."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])


def _same(a, b) -> bool:
    """Equal scales or masks. The identity test settles the usual case (one
    handler around both programs) without comparing tensor values."""
    if a is b:
        return True
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def _scaled_kl(guide_site, model_site, enum_dims=frozenset()):
    """The scaled, masked KL(q || p) with the batch shape of q and p broadcast,
    or None when it is not registered or the sites differ in shape, scale or
    mask (then only the Monte Carlo term reproduces Trace_ELBO's expectation).
    The batch shapes may differ only at enumeration dimensions ``enum_dims``,
    where one of them is 1: q(z|x,y) against p(z), or q(z|x) against p(z|y)."""
    q, p = guide_site["fn"], model_site["fn"]
    shape = _branch_shape(q.batch_shape, p.batch_shape, enum_dims)
    if shape is None or q.event_shape != p.event_shape:
        return None
    if not (_same(guide_site["scale"], model_site["scale"]) and _same(guide_site["mask"], model_site["mask"])):
        return None
    try:
        kl = kl_divergence(q, p)
    except NotImplementedError:
        return None
    value = guide_site["value"]
    if is_identically_zero(kl):
        # Pyro's KL of two distributions masked with False is the float 0.0
        return value.new_zeros(shape)
    return scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).expand(shape)


def _branch_shape(q_shape, p_shape, enum_dims) -> torch.Size | None:
    """``q_shape`` if equal to ``p_shape``; their broadcast shape if they differ
    only at enumeration dimensions (one of them 1 there); else None."""
    if q_shape == p_shape:
        return q_shape
    n = max(len(q_shape), len(p_shape))
    q_shape, p_shape = (1,) * (n - len(q_shape)) + tuple(q_shape), (1,) * (n - len(p_shape)) + tuple(p_shape)
    for i, (a, b) in enumerate(zip(q_shape, p_shape)):
        if a != b and not (i - n in enum_dims and 1 in (a, b)):
            return None
    return torch.Size(max(a, b) for a, b in zip(q_shape, p_shape))


class _Enumerated:
    """An enumerated guide site: its dimension, its K values' probabilities
    q(y|.) (unscaled, unmasked: weights, not terms), its plates, and the
    enumerated sites its q depends on."""

    def __init__(self, site, dim: int):
        self.dim = dim
        self.size = site["value"].shape[dim]
        self.probs = site["fn"].log_prob(site["value"]).exp()
        self.plates = {frame.name for frame in site["cond_indep_stack"] if frame.vectorized}
        self.parents: set = set()


def _enumerated_names(guide_trace) -> tuple:
    """The guide's sites enumerated in parallel, in the guide's order."""
    return tuple(
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
    )


def _enumerated(guide_trace) -> dict:
    """``{name: _Enumerated}`` for the guide's sites enumerated in parallel
    over more than one value (one value weighs 1 and needs no sum)."""
    enum = {}
    for name, site in guide_trace.nodes.items():
        dim = site["infer"].get("_enumerate_dim") if site["type"] == "sample" else None
        if dim is not None and site["value"].shape[dim] > 1:
            enum[name] = _Enumerated(site, dim)
    for name, info in enum.items():
        info.parents = _closure(info.probs, enum, direct=True) - {name}
    return enum


def _closure(tensor: torch.Tensor, enum: dict, direct: bool = False) -> set:
    """The enumerated sites whose dimension ``tensor`` has, with their
    enumerated ancestors in the guide (unless ``direct``)."""
    found = {name for name, info in enum.items() if tensor.dim() >= -info.dim and tensor.shape[info.dim] == info.size}
    frontier = set() if direct else found
    while frontier:
        frontier = {parent for name in frontier for parent in enum[name].parents} - found
        found |= frontier
    return found


def _expectations(terms: dict, enum: dict) -> dict:
    """Each term T replaced by its expectation over the enumerated sites Y it
    depends on, sum_Y prod_{y in Y} q(y|pa(y)) T(Y), per index of its plates
    (the summed dimensions kept, of size 1). Raises ``ValueError`` when such
    a y lies in a plate that T is outside: the expectation is then a sum over
    K^N joint branches, not one per index."""
    out = {}
    for name, (plates, value) in terms.items():
        sites = _closure(value, enum)
        if not sites:
            out[name] = (plates, value)
            continue
        own = {frame.name for frame in plates if frame.vectorized}
        weight = None
        for y in sorted(sites):
            outside = sorted(enum[y].plates - own)
            if outside:
                raise ValueError(
                    f"TraceAnalyticKL_ELBO: site {name!r} lies outside the plate(s) {outside} of the enumerated "
                    f"site {y!r} and depends on it, so the sum over {y!r} does not split by index; move {name!r} "
                    "inside the plate or use TraceEnum_ELBO"
                )
            weight = enum[y].probs if weight is None else weight * enum[y].probs
        dims = sorted({enum[y].dim for y in sites})
        out[name] = (plates, (value * weight).sum(dims, keepdim=True))
    return out


def _latent_order(trace, other) -> list:
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and name in other.nodes and not site["is_observed"]
    ]


def _out_of_order(model_trace, guide_trace) -> list:
    """Shared latent sites z with a site sampled before z in the model but after
    z in the guide: only there can the dependency condition fail."""
    model_order = _latent_order(model_trace, guide_trace)
    guide_position = {name: i for i, name in enumerate(_latent_order(guide_trace, model_trace))}
    return [
        name
        for i, name in enumerate(model_order)
        if any(guide_position[other] > guide_position[name] for other in model_order[:i])
    ]


def _descendants(parents: dict, name: str) -> set:
    """Sites downstream of ``name`` in a ``prior_dependencies`` map."""
    found, frontier = set(), {name}
    while frontier:
        frontier = {child for child, ups in parents.items() if child not in found and frontier & (set(ups) - {child})}
        found |= frontier
    return found
