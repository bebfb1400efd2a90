"""Sphinx configuration of the pyro-arflow site: ``sphinx-build -W docs docs/_build``."""

from __future__ import annotations

import pyro_arflow

project = "pyro-arflow"
author = "the pyro-arflow developers"
release = pyro_arflow.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "results"]  # the runs' tables: included by examples.md
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_custom_sections = [("Arguments", "params_style")]
# references into libraries whose docs this site does not link
nitpicky = False
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"pyro-arflow {release}"
