"""Every example runs end to end at a few steps: a table row per guide and a plot."""

from __future__ import annotations

import subprocess
import sys

import pyro
import pytest
import torch

import pyro_arflow as af
from conftest import EXAMPLES, load_example


@pytest.mark.skipif(
    torch.empty(0).device.type != "cpu", reason="the examples are CPU programs (plots, numpy)"
)
@pytest.mark.parametrize(
    "name, rows_key, expected, options",
    [
        ("stochastic_volatility", "guide", "GUIDES", ["--mcmc-draws", "4", "--draws", "200"]),
        ("local_level", "method", "GUIDES", ["--draws", "200"]),
        ("vae_ar_prior", "model", "MODELS", []),
        ("lorenz_bridge", "guide", "GUIDES", ["--draws", "200"]),
    ],
)
def test_example_runs_and_reports(name, rows_key, expected, options, tmp_path):
    example = load_example(name)
    rows = example.main(["--steps", "15", "--seed", "1", "--out", str(tmp_path), *options])
    names = [row[rows_key] for row in rows]
    assert set(getattr(example, expected)) <= set(names)
    assert len(names) == len(set(names))
    table = "".join(path.read_text() for path in tmp_path.glob(f"{name}*.md"))
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


@pytest.mark.skipif(
    torch.empty(0).device.type != "cpu", reason="the examples are CPU programs (plots, numpy)"
)
def test_volatility_example_takes_a_long_path_with_the_guides_that_fit_there(tmp_path):
    example = load_example("stochastic_volatility")
    arguments = ["--length", "600", "--steps", "5", "--draws", "200", "--out", str(tmp_path)]
    rows = example.main(arguments)
    assert [row["guide"] for row in rows] == list(example.guides_for(600))
    assert "AutoMultivariateNormal" not in example.guides_for(600)
    assert all(0 <= row["90% band coverage"] <= 1 for row in rows)


def test_nile_guides_start_at_the_observations_whatever_was_fitted_before():
    """Pyro's AutoNormal trains its initial value in place; a guide built after one was fitted
    must still start its level path at the data, not where that fit finished."""
    example = load_example("local_level")
    pyro.clear_param_store()
    first = example.GUIDES["AutoNormal"]()
    af.fit(example.model, first, example.FLOW, max_steps=20, progress=False)
    pyro.clear_param_store()
    after = example.GUIDES["AutoMultivariateNormal"]()
    after(example.FLOW)
    assert torch.equal(pyro.param("AutoMultivariateNormal.loc")[3:].detach(), example.FLOW)
