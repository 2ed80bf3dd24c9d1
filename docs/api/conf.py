"""Sphinx configuration of pyrovae's API reference (``docs/api``): build it
with ``sphinx-build -b html docs/api docs/api/_build``.

Built by ``tests/test_api_docs.py`` with warnings as errors, so a docstring
that does not parse fails the test suite. Nothing is downloaded: no
intersphinx, and MathJax is only referenced by the pages (the browser loads
it when one is read).

A page lists a package with ``.. autopackage:: pyrovae.X``: it expands to the
package's own docstring and one ``automodule`` per submodule, found by
import, so a module added to a package is documented without editing a page.
"""

import importlib
import os
import pkgutil
import re
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "pyrovae"
author = "pyrovae developers"
# The docstrings use reStructuredText field lists (:param x:), so no napoleon.
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
# Signatures keep the annotations as written; the types are in the text.
autodoc_typehints = "signature"
# Optional dependency: its module documents without importing it.
autodoc_mock_imports = ["lightning"]
html_theme = "alabaster"
exclude_patterns = ["_build"]
master_doc = "index"

_AUTOPACKAGE = re.compile(r"^\.\. autopackage:: (\S+)\s*$", re.M)


def _expand_autopackages(app, docname, source):
    def expand(match):
        package = importlib.import_module(match.group(1))
        blocks = [f".. automodule:: {package.__name__}\n   :ignore-module-all:\n"]
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            name = f"{package.__name__}.{info.name}"
            blocks.append(f"{name}\n{'-' * len(name)}\n\n.. automodule:: {name}\n")
        return "\n".join(blocks)

    source[0] = _AUTOPACKAGE.sub(expand, source[0])


def setup(app):
    app.connect("source-read", _expand_autopackages)
autodoc_inherit_docstrings = False  # a method we override without a docstring must not show Lightning's (its own Sphinx directives)
