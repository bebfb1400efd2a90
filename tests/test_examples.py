"""Every example and quality benchmark runs end to end at a few steps, as a user runs it (a
fresh interpreter): it writes its table, one row per guide or model, and its figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(
    torch.empty(0).device.type != "cpu", reason="the examples are CPU programs (plots, numpy)"
)


def run(script: str, *arguments: str, out: Path) -> None:
    command = [sys.executable, str(ROOT / script), "--out", str(out), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]


def table_rows(path: Path) -> list[str]:
    """The first cell of every body row of a markdown table."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [line.split("|")[1].strip() for line in lines[2:]]


def assert_figure(path: Path) -> None:
    assert path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "name, arguments, rows",
    [
        (
            "stochastic_volatility",
            ["--seconds", "2", "--steps", "30"],
            ["AutoNormal", "AutoMultivariateNormal", "AutoARFlow"],
        ),
        ("local_level", ["--seconds", "2", "--steps", "30"], ["AutoNormal", "AutoARFlow"]),
        ("vae_ar_prior", ["--steps", "15"], ["Gaussian VAE", "IAF posterior + MAF prior"]),
        ("distributed_vae", ["--steps", "15"], ["1", "2"]),
    ],
)
def test_example_writes_its_table_and_figure(name, arguments, rows, tmp_path):
    run(f"examples/{name}.py", *arguments, out=tmp_path)
    assert table_rows(tmp_path / f"{name}.md") == rows
    assert_figure(tmp_path / f"{name}.png")


GAUSSIANS = ["AutoNormal", "AutoMultivariateNormal", "Pyro AutoIAFNormal"]
FLOWS = ["AutoARFlow('iaf', flat)", "AutoARFlow('iaf-lstm', flat)"]
PRIOR_STRUCTURED = "AutoARFlow (prior-structured)"
PER_DRAW_LAPLACE = "AutoARFlow (per-draw Laplace)"


@pytest.mark.parametrize(
    "name, arguments, rows",
    [
        (
            "stochastic_volatility",
            ["--mcmc-draws", "4", "--draws", "200"],
            [*GAUSSIANS, *FLOWS, PRIOR_STRUCTURED, PER_DRAW_LAPLACE],
        ),
        (
            "local_level",
            ["--draws", "200"],
            [*GAUSSIANS, *FLOWS, PRIOR_STRUCTURED, PER_DRAW_LAPLACE],
        ),
        (
            "lorenz_bridge",
            ["--draws", "200"],
            [*GAUSSIANS, "Pyro AutoStructured (mvn)", "AutoARFlow(paths='flat')", PRIOR_STRUCTURED],
        ),
    ],
)
def test_quality_benchmark_scores_every_guide_against_nuts(name, arguments, rows, tmp_path):
    run(f"benchmarks/quality/{name}.py", "--steps", "15", "--seed", "1", *arguments, out=tmp_path)
    assert set(rows) <= set(table_rows(tmp_path / f"quality_{name}.md"))
    assert_figure(tmp_path / f"quality_{name}.png")


def test_volatility_benchmark_takes_a_long_path_with_the_guides_that_fit_there(tmp_path):
    arguments = ["--length", "600", "--steps", "5", "--draws", "200", "--no-mcmc"]
    run("benchmarks/quality/stochastic_volatility.py", *arguments, out=tmp_path)
    assert not (tmp_path / "quality_stochastic_volatility.md").exists()  # T=200's own name
    rows = table_rows(tmp_path / "quality_stochastic_volatility_T600.md")
    assert "AutoNormal" in rows and "AutoARFlow (prior-structured)" in rows
    assert "AutoMultivariateNormal" not in rows  # a 603 x 603 Cholesky factor is not offered


def test_warm_start_study_compares_both_starts_on_every_model(tmp_path):
    run("benchmarks/quality/warm_start.py", "--steps", "15", "--draws", "200", out=tmp_path)
    rows = table_rows(tmp_path / "quality_warm_start.md")
    assert rows.count("Lorenz bridge") == 2 and rows.count("Nile local level") == 2


def test_seed_study_writes_one_row_per_fit_and_the_spread(tmp_path):
    arguments = ["--seeds", "2", "--steps", "15", "--draws", "200"]
    run("benchmarks/quality/seeds.py", *arguments, out=tmp_path)
    rows = table_rows(tmp_path / "quality_seeds.md")
    # two seeds and their spread for each variant; no per-draw Laplace where there are no globals
    assert rows.count("volatility (T=200)") == 9 and rows.count("Lorenz bridge") == 6


def test_coverage_study_scores_every_data_set_against_nuts_on_it(tmp_path):
    arguments = ["--length", "60", "--datasets", "2", "--steps", "15", "--draws", "200"]
    run("benchmarks/quality/coverage.py", *arguments, "--mcmc-draws", "5", out=tmp_path)
    summary = table_rows(tmp_path / "quality_coverage_T60.md")
    assert summary == ["NUTS (the reference)", "AutoNormal", PRIOR_STRUCTURED]
    by_data_set = table_rows(tmp_path / "quality_coverage_T60_by_data_set.md")
    assert by_data_set == ["20261125"] * 3 + ["20261126"] * 3
    assert_figure(tmp_path / "quality_coverage_T60.png")
