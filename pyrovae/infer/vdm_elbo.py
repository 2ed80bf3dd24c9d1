"""The variational diffusion model's ELBO, at a cost independent of T."""

from __future__ import annotations

import torch
from pyro.infer import ELBO

from pyrovae import params
from pyrovae.infer.bound import Bound
from pyrovae.infer.objective import DifferentiableLossMixin

TERMS = ("recon", "kl_top", "kl_layers")


class VDMELBO(DifferentiableLossMixin, ELBO):
    """-ELBO of a :class:`~pyrovae.diffusion.vdm.VDM`, estimated without tracing
    a chain (Kingma et al. 2021, eqs. 11-17):

        ELBO(x) = E_{q(z_0|x)}[log p(x | z_0)]    ``recon``      one draw of z_0
                - KL(q(z_1|x) || N(0, I))         ``kl_top``     closed form
                - L_diffusion                     ``kl_layers``  k draws of (t, eps)

    where L_diffusion is L_inf = 1/2 E_t[gamma'(t) ||eps - eps_hat||^2] for the
    continuous-time model (``vdm.T is None``) and L_T, the sum of the T-step
    chain's KL terms, otherwise (see :meth:`VDM.diffusion_weight`). Every
    estimate is unbiased; the cost is ``num_particles`` (= k) network calls
    per example whatever T.

    Times are drawn antithetically (low-discrepancy) over the k B draws of a
    batch, t_j = (u + j / (k B)) mod 1 with one u ~ U(0, 1): each t_j is
    marginally uniform, so the estimate stays unbiased, and together they
    cover [0, 1] evenly, which lowers its variance (VDM's default). Draws
    within a batch are then dependent: a standard error must come from
    independent replicates (batches), not from the spread within one.

    ``minimise_variance=True`` (continuous time only) trains the schedule's
    interior (:meth:`GammaSchedule.interior_parameters`) to minimise
    E[l^2], l the diffusion estimate of one draw, instead of the bound (VDM's
    appendix I.2): the bound depends on the schedule only through gamma(0)
    and gamma(1), which are separate parameters that keep following the
    ELBO, so the bound's expectation is unchanged and only its estimator's
    variance moves. It needs a denoiser conditioned on gamma_t, as
    :class:`VDM`'s is. The loss's value is still -ELBO; only the gradient
    reaching the interior changes (a surrogate term of value 0), so any
    trainer that backpropagates ``differentiable_loss`` gets it. The schedule
    enters l only through (gamma_t, w) at the drawn times, with gamma_t =
    gamma_min + W shape(t) and w = W shape'(t), and d(l^2) = 2 l dl: one extra
    backward pass to (gamma_t, w) gives dl/d(gamma_t, w) per draw, and the
    surrogate sum_draws [dl . (gamma_t, w)|ends + 2 l dl . (gamma_t, w)|interior] / k,
    with the shape detached in the first and the end points in the second,
    carries both gradients.

    Drop-in for ``SVI(vdm.model, vdm.guide, optim, VDMELBO())``: ``model`` must
    be the bound method ``vdm.model`` of a VDM and ``guide`` its ``vdm.guide``
    (the encoder is fixed; neither is run). Losses are summed over the batch,
    as Pyro's ELBOs sum over a plate.
    """

    # gamma'(t) is a derivative taken inside the loss, so its gradient is a double backward, which
    # torch.compile's aot_autograd does not support (tried: the first backward raises): pyrovae.compiled refuses it
    compilable = False

    def __init__(self, num_particles: int = 1, antithetic: bool = True, minimise_variance: bool = False):
        super().__init__(num_particles=num_particles)
        self.antithetic, self.minimise_variance = antithetic, minimise_variance

    @torch.compiler.disable  # a check on Python objects: under torch.compile it runs as it is
    def _vdm(self, model, guide):
        from pyrovae.diffusion.vdm import VDM

        vdm = getattr(model, "__self__", None)
        if not isinstance(vdm, VDM) or model.__func__ is not VDM.model:
            raise TypeError(f"VDMELBO needs model=vdm.model of a VDM, got {model!r}")
        if getattr(guide, "__self__", None) is not vdm or guide.__func__ is not VDM.guide:
            raise TypeError(f"VDMELBO needs guide=vdm.guide of the same VDM, got {guide!r}")
        if self.minimise_variance and vdm.T is not None:
            raise ValueError(
                "minimise_variance needs the continuous-time model (T=None): "
                f"the {vdm.T}-step bound depends on the schedule's interior"
            )
        return vdm

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("VDMELBO never traces a chain: that is what makes it O(1) in T")

    def draw_times(self, k: int, B: int, like: torch.Tensor) -> torch.Tensor:
        """t of shape ``(k, B)``, each U(0, 1): antithetic over the k B draws, or i.i.d."""
        if not self.antithetic:
            return torch.rand(k, B, dtype=like.dtype, device=like.device)
        u = torch.rand((), dtype=like.dtype, device=like.device)
        return torch.remainder(u + torch.arange(k * B, dtype=like.dtype, device=like.device) / (k * B), 1.0).reshape(
            k, B
        )

    def bound_terms(self, vdm, x: torch.Tensor, y: torch.Tensor | None = None) -> Bound:
        """The bound's named terms per example (:class:`~pyrovae.infer.bound.Bound`),
        nats, each ``(B,)``: ``recon``, ``kl_top``, ``kl_layers`` (L_diffusion,
        the mean of k draws); bits/dim from ``elbo()``."""
        return self.estimate(vdm, x, y)[0]

    def estimate(
        self, vdm, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[Bound, torch.Tensor, torch.Tensor | None]:
        """``(bound, per_draw, surrogate)``: the :meth:`bound_terms`; ``per_draw``
        ``(k, B)``, the diffusion estimate of each draw; and ``surrogate``, a
        scalar of value 0 that carries the schedule's gradient when
        ``minimise_variance`` (else ``None``)."""
        params.module(vdm, "vdm")  # a name of its own in the param store
        x = vdm.check_data(x)
        if y is not None:  # the bound of log p(x | y): eps_hat at the real y, never guided
            from pyrovae.diffusion.denoisers import conditioned

            vdm = conditioned(vdm, y)
        k = self.num_particles
        t = self.draw_times(k, x.shape[0], x)
        surrogate = None
        if self.minimise_variance and torch.is_grad_enabled():
            gamma = vdm.gamma
            shape, dshape = gamma.shape_and_derivative(t)
            low, width = gamma.gamma_min.to(x.dtype), gamma.log_width.exp().to(x.dtype)
            leaves = ((low + width * shape).detach().requires_grad_(), (width * dshape).detach().requires_grad_())
            per_draw = vdm.diffusion_loss(x, *leaves)
            c_gamma, c_w = torch.autograd.grad(per_draw.sum(), leaves, retain_graph=True)
            ends = c_gamma * (low + width * shape.detach()) + c_w * (width * dshape.detach())
            interior = c_gamma * (low.detach() + width.detach() * shape) + c_w * (width.detach() * dshape)
            carrier = (ends + 2 * per_draw.detach() * interior).sum() / k
            surrogate = carrier - carrier.detach()
        else:
            per_draw = vdm.diffusion_loss(x, *vdm.diffusion_weight(t))
        bound = Bound(recon=vdm.recon(x), kl_top=vdm.prior_kl(x), kl_layers=per_draw.mean(0), dim=vdm.x_dim)
        return bound, per_draw, surrogate

    def differentiable_loss(self, model, guide, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-ELBO (of log p(x | y) given ``y``) summed over the batch; its gradient
        is the bound's, except in the schedule's interior under ``minimise_variance``."""
        bound, _, surrogate = self.estimate(self._vdm(model, guide), x, y)
        loss = -bound.elbo().sum()
        return loss if surrogate is None else loss + surrogate
