"""The documentation site builds with warnings as errors and covers every public name."""

from __future__ import annotations

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


def test_every_public_name_has_an_api_entry():
    reference = (DOCS / "api.rst").read_text()
    missing = [name for name in af.__all__ if f"pyro_arflow.{name}" not in reference]
    assert not missing, missing


def test_no_private_name_in_the_readme_or_the_docs():
    pages = [ROOT / "README.md", *DOCS.glob("*.md"), *DOCS.glob("*.rst")]
    private = re.compile(r"pyro_arflow\._\w+|af\._\w+")
    found = {page.name: private.findall(page.read_text()) for page in pages}
    assert not any(found.values()), found


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
