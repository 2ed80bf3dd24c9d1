"""Parameters owned by their modules, under names of their own in Pyro's param store.

Pyro's param store is global and keyed by name. ``pyro.module("vae", self)``
in every VAE made a second VAE in the same session train the *first* one's
tensors (the store hands back what it holds under a name). :func:`module`
registers a model under a name unique to the instance (``"vae"``, then
``"vae_1"``, ``"vae_2"``, ...), kept for the instance's life and never reused
by a copy (``copy.deepcopy``, ``AveragedModel``) or a later model, so stock
``SVI(model.model, model.guide, pyro.optim.Adam(...), Trace_ELBO())`` trains
any number of models in one process without ``pyro.clear_param_store()``.

The trainer steps the modules' own parameters with one torch optimiser and
needs no param store: inside :func:`unregistered` the registration is skipped
(it walks every parameter and looks each up in the store, on every call of
model and guide).

**Pickling.** Each lookup in the param store sets ``p.unconstrained =
weakref.ref(p)`` on the parameter it returns (Pyro's ``ParamStoreDict``), and
for an unconstrained parameter that is the module's own ``nn.Parameter``: after
one SVI step ``torch.save(model)``, ``pickle.dumps(model)`` and
``multiprocessing`` failed with ``cannot pickle 'weakref.ReferenceType'``.
Importing this module registers a reducer for ``nn.Parameter`` (``copyreg``)
that drops that attribute first, as Pyro's own ``ParamStore.get_state`` does;
the store sets it again at its next lookup. Any other parameter pickles as
before.
"""

from __future__ import annotations

import contextlib
import copyreg
import itertools
import threading
import weakref

import pyro
import torch

_names: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_counters: dict = {}
_skip = threading.local()


def _reduce_parameter(p: torch.nn.Parameter):
    p.__dict__.pop("unconstrained", None)  # the param store's weakref to p itself, set at each lookup
    return torch.nn.Parameter.__reduce_ex__(p, 2)


copyreg.pickle(torch.nn.Parameter, _reduce_parameter)


def pyro_name(nn_module: torch.nn.Module, kind: str) -> str:
    """The instance's name in the param store: ``kind`` for the first module of
    that kind in the process, ``f"{kind}_{n}"`` for the n-th after it."""
    name = _names.get(nn_module)
    if name is None:
        n = next(_counters.setdefault(kind, itertools.count()))
        name = _names[nn_module] = kind if n == 0 else f"{kind}_{n}"
    return name


def module(nn_module: torch.nn.Module, kind: str) -> torch.nn.Module:
    """``pyro.module(pyro_name(nn_module, kind), nn_module)``, skipped inside :func:`unregistered`."""
    if getattr(_skip, "active", False):
        return nn_module
    return pyro.module(pyro_name(nn_module, kind), nn_module)


@contextlib.contextmanager
def unregistered():
    """Run model and guide without registering their modules in the param
    store: for a loss differentiated with respect to ``nn.Module.parameters()``
    directly (the trainer's path), where the store is never read."""
    before = getattr(_skip, "active", False)
    _skip.active = True
    try:
        yield
    finally:
        _skip.active = before
