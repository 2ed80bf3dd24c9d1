"""Names -> things: the one lookup every registry of the library goes through
(priors, guides, likelihoods, nets, schedules, objectives, models ...), so that
an unknown name is always the same ``ValueError``::

    unknown prior 'uniform'; expected one of normal, mog, vamp, flow
"""

from __future__ import annotations

from collections.abc import Mapping


def lookup(kind: str, name, registry, alternative: str = "", note: str = ""):
    """``registry[name]``, or a ``ValueError`` ``"unknown {kind} {name!r}
    ({note}); expected one of ..."`` listing the registry's names (and
    ``alternative``, e.g. ``"an nn.Module"``, when something else is accepted
    too); the ``({note})``, what the name is for, only when given.

    :param registry: a mapping (its value is returned) or a sequence of the
        allowed names (``name`` itself is returned).
    """
    if name not in registry:
        expected = ", ".join(map(str, registry))
        what = f" ({note})" if note else ""
        also = f" or {alternative}" if alternative else ""
        raise ValueError(f"unknown {kind} {name!r}{what}; expected one of {expected}{also}")
    return registry[name] if isinstance(registry, Mapping) else name
