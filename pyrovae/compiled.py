"""The compiled path: the loss captured once per batch shape and replayed with no Python tracing.

Every call of a Pyro ELBO runs the model and the guide as Python: the
messenger stack at each sample site, the distributions' construction, the
traces and the ELBO's bookkeeping around a few dozen tensor operations. For a
small model that Python costs as much as the arithmetic. Once the structure of
model and guide is known it does not change from step to step, so
:class:`CompiledLoss` records it once:

- **capture** (:func:`torch.export.export`, non-strict): the loss of a batch
  (model, guide and ELBO together) runs once on fake tensors and every tensor
  operation it performs is recorded in a graph, the random draws included
  (``normal_`` is an operation like any other, so each replay draws afresh
  from torch's generator). Parameters and buffers are the graph's inputs,
  looked up in the live modules at each call: an optimiser step or
  ``load_state_dict`` is seen at once. One graph per batch shape, dtype and
  device, parameter dtype, set of modules and their train/eval modes, and
  the objective's settings (its ``capture_key``; fp32: under
  ``torch.autocast`` the loss runs eagerly), as Pyro's ``JitTrace_ELBO`` keeps one trace
  per input shape; with the same seed a replay returns the eager loss bit
  for bit.
- **compile** (``backend="inductor"``, the default): the captured graph,
  which holds no Python, goes to ``torch.compile`` whole (``fullgraph``),
  which fuses its elementwise operations and those of its backward pass.
  ``backend=None`` replays the graph operation by operation.

What a graph cannot hold, and so what the capture requires:

- **No Python control flow on tensor values.** A model that branches on its
  data (``if x.sum() > 0``) fails to capture (the fake tensors have no values)
  and the loss stays eager, with a warning naming the reason. Pyro's
  validation reads values too: the first batch of each shape is therefore
  run eagerly, under validation when it is on (its errors surface as they
  would without ``compile``; later batches of that shape are not
  validated), and the graph is captured without it; that
  run's draws are put back, so every step, the first included, takes the
  graph's draws (a run and its resumption draw alike).
- **Python numbers are constants.** A number the model or guide reads in
  Python (a temperature, a size) is recorded as it was at the capture.
- **No state written while the loss runs.** The objective's own settings
  that change between steps stay outside the graph: an objective may split
  its loss into parts (``loss_parts`` / ``loss_from_parts``, as
  :class:`~pyrovae.infer.TraceAnalyticKL_ELBO` does, so that a KL warm-up
  changing ``kl_scale`` every epoch reuses the graph). Objectives that keep
  state between steps or branch on values (the diffusion chain's, whose time
  sampler learns from each step and which scores the decoder only where
  t = 1) are not captured: for them :func:`compile_loss` falls back to
  ``torch.compile`` of the eager loss, which handles both with graph breaks.

An objective declares that it can be captured with ``capturable = True``,
and that ``torch.compile`` cannot trace it with ``compilable = False``
(:func:`compile_loss` then refuses it, before a run writes anything).
"""

from __future__ import annotations

import warnings

import pyro
import torch
from torch import nn

from pyrovae import params
from pyrovae.nets import first_parameter


def capturable(objective) -> bool:
    """Whether ``objective``'s loss may be captured into a graph (it says so)."""
    return bool(getattr(objective, "capturable", False))


class CompiledLoss(nn.Module):
    """``loss_module(batch)`` captured into one graph per batch shape and
    replayed (see the module's docstring): the same loss, with the Python
    tracing of model and guide done once instead of every step.

    :param loss_module: a :class:`pyrovae.train.LossModule` (``.model``,
        ``.objective``; ``forward(batch)`` the loss) whose objective is
        :func:`capturable`.
    :param backend: ``torch.compile``'s backend for the graph: ``"inductor"``
        (fused kernels, a compile of seconds per batch shape), another of its
        backends, or ``None`` (the graph replayed operation by operation: no
        compile time).
    """

    def __init__(self, loss_module: nn.Module, backend: str | None = "inductor"):
        super().__init__()
        if backend is not None and not (isinstance(backend, str) or callable(backend)):
            raise TypeError(f"backend must be a torch.compile backend (a name or a callable) or None, got {backend!r}")
        if not capturable(loss_module.objective):
            raise TypeError(
                f"{type(loss_module.objective).__name__} does not declare itself capturable (capturable = True); use torch.compile(loss_module) instead"
            )
        self.loss_module = loss_module
        self.backend = backend
        self._graphs: dict = {}
        self.failed: str | None = None  # why capture failed (the loss then stays eager)
        self._warned_autocast = False

    @property
    def graphs(self) -> int:
        """How many graphs have been captured (one per batch shape, dtype, device, mode)."""
        return len(self._graphs)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        objective = self.loss_module.objective
        if self.failed is not None:
            return self.loss_module(batch)
        if torch.is_autocast_enabled(batch.device.type):
            # autocast decides its casts per operation as the Python runs: a replayed graph
            # does not reproduce the eager loss, so mixed precision stays eager
            if not self._warned_autocast:
                self._warned_autocast = True
                warnings.warn(
                    "CompiledLoss: under torch.autocast (precision bf16) the loss runs eagerly, not captured",
                    stacklevel=2,
                )
            return self.loss_module(batch)
        model = self.loss_module.model
        # Everything a graph bakes in: the batch's shape, dtype and device, the parameters'
        # dtype, every module's identity and train/eval mode (a swapped submodule, dropout
        # switched by model.eval()), the objective's settings (particles, plates)
        settings = objective.capture_key() if hasattr(objective, "capture_key") else ()
        key = (
            tuple(batch.shape),
            batch.dtype,
            batch.device,
            first_parameter(model).dtype,
            _modes(self.loss_module),
            settings,
        )
        replay = self._graphs.get(key)
        if replay is None:
            devices = [batch.device] if batch.device.type == "cuda" else []
            # The first batch of a shape is run eagerly first, without gradients and with the
            # random streams put back: under validation, when it is on, its errors surface as
            # without compile, and the objective's caches see real values. Every step, the
            # first included, then takes the graph's draws: a run and its resumption draw alike.
            with torch.no_grad(), torch.random.fork_rng(devices):
                self.loss_module(batch)
            replay = self._capture(batch, key, devices)
            if replay is None:
                return self.loss_module(batch)
        parts = replay(batch)
        return objective.loss_from_parts(parts) if hasattr(objective, "loss_from_parts") else parts[0]

    def _capture(self, batch: torch.Tensor, key: tuple, devices: list):
        """Capture and return the graph for ``key``; on failure warn once and
        return ``None`` (the loss stays eager)."""
        target = _Parts(self.loss_module)
        # Python attributes the program writes as it runs (Pyro's transforms cache their last
        # input and output) would keep the capture's fake tensors: each module's are put back
        attributes = [(module, dict(module.__dict__)) for module in target.modules()]
        try:
            # (the capture draws from fake generators: forked so that no real stream can move)
            with torch.random.fork_rng(devices), pyro.validation_enabled(False), warnings.catch_warnings():
                # export's notes about its own internals (and about those attributes) are not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
                try:
                    program = torch.export.export(target, (batch,), strict=False)
                finally:
                    for module, saved in attributes:
                        for name in set(module.__dict__) - set(saved):
                            del module.__dict__[name]
                        module.__dict__.update(saved)
            self._graphs[key] = _Replay(program, target, self.backend)
        except Exception as err:  # what export cannot follow: value-dependent Python, unsupported ops
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(
                f"CompiledLoss: the loss could not be captured into a graph ({self.failed}); it runs eagerly",
                stacklevel=3,
            )
            return None
        return self._graphs[key]


class _Parts(nn.Module):
    """The capture's target: the objective's loss parts (``loss_parts``, or
    the loss itself as one part) as a tuple of tensors."""

    def __init__(self, loss_module: nn.Module):
        super().__init__()
        self.loss_module = loss_module

    def forward(self, batch: torch.Tensor) -> tuple:
        lm = self.loss_module
        if hasattr(lm.objective, "loss_parts"):
            with params.unregistered():
                parts = lm.objective.loss_parts(lm.model.model, lm.model.guide, batch)
        else:
            parts = (lm(batch),)
        # a part that is a Python number (no term of that kind) becomes a tensor; tensors keep their dtype
        return tuple(
            p if torch.is_tensor(p) else torch.tensor(p, dtype=batch.dtype, device=batch.device) for p in parts
        )


class _Replay:
    """One captured graph, called with the live parameters and buffers and
    the batch. Each input is looked up at each call in the dict of the module
    that owns it (``module._parameters[name]``): the tensors the optimiser
    steps, and those that ``load_state_dict(assign=True)`` or ``.to()`` put
    in their place."""

    def __init__(self, program, target: nn.Module, backend: str | None):
        signature = program.graph_signature
        if signature.buffers_to_mutate or getattr(signature, "user_inputs_to_mutate", None):
            raise TypeError("the loss writes to a buffer or its input: a captured graph cannot replay that")
        refs = []
        for spec in signature.input_specs:
            kind = spec.kind.name
            if kind == "USER_INPUT":
                refs.append(None)
            elif kind in ("PARAMETER", "BUFFER"):
                owner, _, name = spec.target.rpartition(".")
                module = target.get_submodule(owner)
                refs.append((module._parameters if kind == "PARAMETER" else module._buffers, name))
            else:  # a constant the program made (a tensor it built from Python numbers)
                refs.append(({spec.target: program.constants[spec.target]}, spec.target))
        if refs.count(None) != 1:
            raise TypeError(f"expected the batch as the graph's one user input, got {refs.count(None)}")
        at = refs.index(None)
        self.before, self.after = refs[:at], refs[at + 1 :]
        self.plain = program.graph_module
        self.graph = (
            torch.compile(self.plain, backend=backend, fullgraph=True, dynamic=False) if backend else self.plain
        )
        self.compiled = False  # whether the compiled graph has run once

    def inputs(self, batch: torch.Tensor) -> list:
        return [d[k] for d, k in self.before] + [batch] + [d[k] for d, k in self.after]

    def __call__(self, batch: torch.Tensor) -> tuple:
        inputs = self.inputs(batch)
        if self.compiled or self.graph is self.plain:
            return self.graph(*inputs)
        try:
            # torch.compile compiles on the first call: a backend that cannot (inductor
            # without a C++ compiler, say) leaves the captured graph, replayed as it is
            out = self.graph(*inputs)
        except Exception as err:
            warnings.warn(
                f"CompiledLoss: the backend could not compile the captured graph ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); replaying it uncompiled",
                stacklevel=3,
            )
            self.graph = self.plain
            return self.plain(*inputs)
        self.compiled = True
        return out


def _modes(module: nn.Module) -> tuple:
    """``(id, training)`` of ``module`` and every submodule, depth first (a walk
    of the ``_modules`` dicts, cheaper than ``modules()``'s generator)."""
    found = [(id(module), module.training)]
    for child in module._modules.values():
        if child is not None:
            found.extend(_modes(child))
    return tuple(found)


def compile_loss(loss_module: nn.Module, backend: str | None = "inductor", wrap=None) -> nn.Module:
    """The compiled path for a :class:`pyrovae.train.LossModule`: a
    :class:`CompiledLoss` when its objective is capturable (the VAE's and the
    hierarchical VAE's ELBO), else ``torch.compile(loss_module)`` (the
    diffusion chain's objective: plain torch that dynamo follows,
    value-dependent branches and the time sampler's state included), with
    ``backend`` ``None`` meaning dynamo's ``"eager"`` backend there. An
    objective with ``compilable = False`` (VDM's: dynamo stops at "VDM.model is
    not a constant" from a fresh process) is a ``ValueError``; on the CPU the
    ``torch.compile`` path warns that it is slower than eager for short runs.

    :param wrap: what the trainer puts around the loss module
        (``DistributedDataParallel`` under torchrun): around the captured
        loss, or inside ``torch.compile``, which then splits its graphs at
        DDP's gradient buckets."""
    wrap = wrap or (lambda module: module)
    objective = loss_module.objective
    if capturable(objective):
        return wrap(CompiledLoss(loss_module, backend))
    if not getattr(objective, "compilable", True):
        raise ValueError(
            f"--compile does not work with this model's objective, {type(objective).__name__}: torch.compile "
            "cannot trace its loss; train without --compile"
        )
    parameter = first_parameter(loss_module.model)
    if backend is not None and parameter is not None and parameter.device.type == "cpu":
        warnings.warn(
            f"--compile of {type(objective).__name__} on the CPU: torch.compile of this loss, with its graph "
            "breaks, is much slower than without --compile on the CPU (one tiny epoch of the diffusion chain on "
            "digits: 279 s against 28 s, most of it compiling); it pays on a GPU",
            UserWarning,
            stacklevel=2,
        )
    return torch.compile(wrap(loss_module), backend=backend or "eager")
