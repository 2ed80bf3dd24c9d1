"""How ``pyrovae train MODEL`` builds, feeds, evaluates and draws each model:
one recipe per model (:class:`~pyrovae.recipes.base.Recipe`) for the shared loop
in :mod:`pyrovae.train` and the command line, and the registry :data:`MODELS`
of model names, each with its config class (which owns the model's defaults
and flags) and its recipe.

**Adding a model** is three steps: a module ``pyrovae/recipes/x.py`` with a
dataclass ``XConfig(TrainConfig)`` whose ``model`` field defaults to the name
(``model: str = override("model", "x")``), its own fields declared with
:func:`~pyrovae.config.option` and changed common defaults with
:func:`~pyrovae.config.override`; a ``Recipe`` subclass beside it; one line in
:data:`MODELS`.
"""

from __future__ import annotations

from typing import NamedTuple

from pyrovae.recipes.base import Recipe
from pyrovae.recipes.conditional import ConditionalRecipe
from pyrovae.recipes.diffusion import DiffusionConfig, DiffusionRecipe
from pyrovae.recipes.hvae import HVAEConfig, HVAERecipe
from pyrovae.recipes.ssvae import SSVAERecipe
from pyrovae.recipes.vae import VAEConfig, VAERecipe
from pyrovae.recipes.vdm import VDMConfig, VDMRecipe


class Model(NamedTuple):
    config: type
    recipe: Recipe


MODELS = {
    "vae": Model(VAEConfig, VAERecipe()),
    "hvae": Model(HVAEConfig, HVAERecipe()),
    "diffusion": Model(DiffusionConfig, DiffusionRecipe()),
    "vdm": Model(VDMConfig, VDMRecipe()),
}
"""Model name -> its config class and its recipe; ``pyrovae train NAME`` and
``TrainConfig(model=NAME)`` look names up here."""


def recipe_for(cfg) -> Recipe:
    """The recipe that trains ``cfg``: its model's, M2's for a VAE given
    ``labelled``, or its model's conditional twin's given ``conditional``."""
    if getattr(cfg, "labelled", None) is not None:
        return SSVAERecipe()
    if getattr(cfg, "conditional", False):
        return ConditionalRecipe(MODELS[cfg.model].recipe)
    return MODELS[cfg.model].recipe


__all__ = ["MODELS", "Model", "Recipe", "recipe_for", "VAEConfig", "HVAEConfig", "DiffusionConfig", "VDMConfig"]
