"""The documentation site builds with warnings as errors and covers every public name."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyro_arflow as af

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="the docs tools come with the test extra")
    command = [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(DOCS), str(tmp_path)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "api.html").exists()


EXTENSION_MODULES = [
    "ordering",
    "cached",
    "validation",
    "landing",
    "guides",
    "conditioners.masks",
    "recurrences",
]


def public_names() -> list[tuple[str, object]]:
    """(documented name, object) for ``af.__all__`` and the extension modules' ``__all__``."""
    names = [(f"pyro_arflow.{name}", getattr(af, name)) for name in af.__all__]
    for module_name in EXTENSION_MODULES:
        module = importlib.import_module(f"pyro_arflow.{module_name}")
        names += [(name, getattr(module, name)) for name in module.__all__]
    return names


def test_every_public_name_has_an_api_entry():
    reference = (DOCS / "api.rst").read_text()
    missing = [name for name, _ in public_names() if name.split(".")[-1] not in reference]
    assert not missing, missing


def test_every_public_class_and_function_has_a_runnable_example():
    """Each carries a ``>>>`` example (its own, or its module's for a module-level constant);
    the doctests run them in the default test command."""
    without = [
        name
        for name, value in public_names()
        if (inspect.isclass(value) or inspect.isfunction(value))
        and ">>>" not in (value.__doc__ or "")
    ]
    assert not without, without


def test_no_private_name_in_the_readme_or_the_docs():
    pages = [ROOT / "README.md", *DOCS.glob("*.md"), *DOCS.glob("*.rst")]
    private = re.compile(r"pyro_arflow\._\w+|af\._\w+")
    found = {page.name: private.findall(page.read_text()) for page in pages}
    assert not any(found.values()), found


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
