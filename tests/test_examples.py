"""Every example runs end to end at a few steps: a table row per guide and a plot."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, load_example


@pytest.mark.skipif(
    torch.empty(0).device.type != "cpu", reason="the examples are CPU programs (plots, numpy)"
)
@pytest.mark.parametrize(
    "name, rows_key, expected",
    [
        ("stochastic_volatility", "guide", "GUIDES"),
        ("local_level", "method", "GUIDES"),
        ("vae_ar_prior", "model", "MODELS"),
    ],
)
def test_example_runs_and_reports(name, rows_key, expected, tmp_path):
    example = load_example(name)
    rows = example.main(["--steps", "15", "--seed", "1", "--out", str(tmp_path)])
    names = [row[rows_key] for row in rows]
    assert set(getattr(example, expected)) <= set(names)
    assert len(names) == len(set(names))
    table = (tmp_path / f"{name}.md").read_text()
    for row_name in names:
        assert f"| {row_name}" in table
    png = tmp_path / f"{name}.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(
    torch.empty(0).device.type != "cpu", reason="the examples are CPU programs (plots, numpy)"
)
def test_distributed_example_compares_one_and_two_processes(tmp_path):
    """Run as a user would (a fresh interpreter spawning its ranks), at a few steps."""
    script = EXAMPLES / "distributed_vae.py"
    arguments = ["--compare", "--steps", "15", "--seed", "1", "--out", str(tmp_path)]
    subprocess.run([sys.executable, str(script), *arguments], check=True, capture_output=True)
    table = (tmp_path / "distributed_vae.md").read_text()
    assert "| 1         | gloo" in table and "| 2         | gloo" in table
    png = tmp_path / "distributed_vae.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "distributed_vae_2.pt").exists()  # rank 0's checkpoint
