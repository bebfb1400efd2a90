"""What the examples share: command line, scores against NUTS, ELBO estimates, tables, NUTS runs."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pyro
import torch
from matplotlib.figure import Figure
from pyro.infer import MCMC, NUTS, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median

import pyro_arflow as af


def parse_args(
    description: str,
    default_steps: int,
    argv: Sequence[str] | None,
    flags: dict[str, str] | None = None,
    options: dict[str, tuple[int, str]] | None = None,
    lists: dict[str, str] | None = None,
) -> argparse.Namespace:
    """``--steps``, ``--seed``, ``--out``, boolean ``flags`` (name -> help), integer
    ``options`` (name -> (default, help)) and string ``lists`` (name -> help; default None)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--steps",
        type=int,
        default=default_steps,
        help="most SVI steps per guide (training stops earlier once the ELBO is flat)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inference")
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for the plot and table"
    )
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    for option, (default, help_text) in (options or {}).items():
        parser.add_argument(option, type=int, default=default, help=help_text)
    for option, help_text in (lists or {}).items():
        parser.add_argument(option, nargs="+", default=None, help=help_text)
    return parser.parse_args(argv)


def posterior_error(
    draws: dict[str, torch.Tensor], reference: dict[str, dict], sites: Sequence[str]
) -> tuple[float, float]:
    """Over every coordinate of ``sites``: the mean of |mean - NUTS mean| / NUTS sd, and of
    |log(sd / NUTS sd)|. ``draws[site]`` is shaped ``(draws, *site_shape)``."""
    errors, log_ratios = [], []
    for site in sites:
        value = draws[site].reshape(len(draws[site]), -1)
        mean = torch.tensor(reference[site]["mean"]).reshape(-1)
        sd = torch.tensor(reference[site]["sd"]).reshape(-1)
        errors.append((value.mean(0) - mean).abs() / sd)
        log_ratios.append((value.std(0) / sd).log().abs())
    return torch.cat(errors).mean().item(), torch.cat(log_ratios).mean().item()


ELBO_WINDOW = 100


def plot_elbo_traces(axis: Any, fits: dict[str, af.FitResult], span: float = 40.0) -> None:
    """Each guide's ELBO, averaged over windows of 100 steps (fewer for short smoke runs),
    against the step; the vertical range is the top ``span`` nats, where the guides finish."""
    finished = [fit.steps for fit in fits.values() if not fit.diverged] or [ELBO_WINDOW]
    window = max(1, min(ELBO_WINDOW, min(finished) // 4))
    for name, fit in fits.items():
        label = f"{name} ({fit.status if fit.diverged else f'{fit.steps} steps'})"
        axis.plot(*fit.smoothed(window), label=label, linewidth=1.0)
    top = max(max(fit.smoothed(window)[1], default=-math.inf) for fit in fits.values())
    axis.set_ylim(top - span, top + 0.1 * span)
    axis.set_title("ELBO while training with af.fit: until flat or out of budget, then annealed")
    axis.set_xlabel("step")
    axis.set_ylabel(f"ELBO, mean of {window} steps")
    axis.legend(fontsize=7, loc="lower right")


@torch.no_grad()
def elbo_estimate(model: Callable, guide: Callable, data: tuple, particles: int = 1000) -> float:
    """The ELBO by ``particles`` vectorized draws (standard error well under 0.1 nats here)."""
    return -Trace_ELBO(num_particles=particles, vectorize_particles=True).loss(model, guide, *data)


KHAT_REPEATS = 5
DRAWS_OPTION = {
    "--draws": (
        4000,
        f"guide draws for the scores, and for each of the {KHAT_REPEATS} k-hat estimates",
    )
}


def khat_median(model: Callable, guide: Callable, data: tuple, draws: int) -> float:
    """The median of ``KHAT_REPEATS`` PSIS k-hats of ``draws`` draws each.

    One estimate is too noisy to compare with the 0.7 threshold here: three estimates of one
    Nile guide gave 0.41 to 0.70 at 1000 draws, 0.60 to 0.82 at 4000 and 0.57 to 0.87 at 16000
    (its largest weights come from rare draws), so the examples report the median of several.
    """
    khats = [af.psis_khat(model, guide, *data, num_particles=draws) for _ in range(KHAT_REPEATS)]
    return float(torch.tensor(khats).median())


def guide_draws(
    model: Callable, guide: Callable, data: tuple, draws: int, sites: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``draws`` draws of ``sites`` from a fitted guide, each shaped ``(draws, *site_shape)``
    (scalar sites ``(draws,)``)."""
    with torch.no_grad():
        values = Predictive(
            model, guide=guide, num_samples=draws, parallel=True, return_sites=list(sites)
        )(*data)
    return per_draw(values, draws)


def per_draw(values: dict[str, torch.Tensor], draws: int) -> dict[str, torch.Tensor]:
    """Each site's ``draws`` values shaped ``(draws, *site_shape)`` (scalar sites
    ``(draws,)``), whatever batch dims a vectorized run left."""
    return {site: value.reshape(draws, -1).squeeze(-1) for site, value in values.items()}


def fit_columns(
    fit: af.FitResult, model: Callable, guide: Callable, data: tuple, draws: int
) -> dict[str, Any]:
    """The columns every guide's row starts with: steps, how training ended and the ELBO
    particles per step ``fit`` chose, then (unless it diverged, leaving nothing to score)
    seconds, ELBO and k-hat."""
    columns: dict[str, Any] = {
        "steps": fit.steps,
        "converged": fit.status,
        "particles": fit.num_particles,
    }
    if not fit.diverged:
        columns["seconds"] = fit.seconds
        columns["ELBO"] = elbo_estimate(model, guide, data)
        columns[f"PSIS k-hat (median of {KHAT_REPEATS})"] = khat_median(model, guide, data, draws)
    return columns


def resampled_columns(
    model: Callable,
    guide: Callable,
    data: tuple,
    draws: int,
    reference: dict[str, dict],
    sites: Sequence[str],
) -> dict[str, float]:
    """The globals' errors against NUTS after Pareto-smoothed importance resampling of the
    guide (``af.importance_resample``, ``draws`` draws from ten times as many proposals), and
    the resampling's k-hat."""
    resampled = af.importance_resample(model, guide, *data, num_samples=draws)
    error, log_sd = posterior_error(per_draw(resampled.samples, draws), reference, sites)
    return {
        "IS k-hat": resampled.khat,
        "IS globals mean err": error,
        "IS globals log-sd err": log_sd,
    }


def print_table(title: str, rows: list[dict[str, Any]], out: Path, name: str) -> str:
    """Print ``rows`` as an aligned markdown table and save it beside the plot."""
    columns = list(dict.fromkeys(column for row in rows for column in row))
    cells = [[_cell(row.get(c, math.nan)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(map(str.ljust, r, widths)) + " |" for r in cells),
    ]
    text = f"{title}\n\n" + "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def comparison_guides(
    model: Callable, init_loc_fn: Callable = init_to_median
) -> dict[str, Callable[[], Any]]:
    """The guides the latent time-series examples compare: mean field, full-rank Gaussian,
    Pyro's IAF guide, ours flat with a masked and with an LSTM conditioner (same widths as
    Pyro's), and ours built around the model's path prior: with the path's Laplace
    approximation at the initial globals as its start (``paths="prior"``) and with each
    draw's own (``paths="laplace"``).

    All start from ``init_loc_fn`` but Pyro's ``AutoIAFNormal``, which ignores it (it starts
    at N(0, I) in the unconstrained space), and the prior-structured guides' paths, which
    ``af.fit`` starts at their Laplace approximation given the initial globals.
    """
    return {
        "AutoNormal": lambda: AutoNormal(model, init_loc_fn=init_loc_fn),
        "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model, init_loc_fn=init_loc_fn),
        "Pyro AutoIAFNormal": lambda: AutoIAFNormal(model, hidden_dim=[256], num_transforms=2),
        "AutoARFlow('iaf', flat)": lambda: af.AutoARFlow(
            model, flow="iaf", hidden_dims=[256], init_loc_fn=init_loc_fn, paths="flat"
        ),
        "AutoARFlow('iaf-lstm', flat)": lambda: af.AutoARFlow(
            model, flow="iaf-lstm", hidden_size=32, init_loc_fn=init_loc_fn, paths="flat"
        ),
        PRIOR_STRUCTURED: lambda: af.AutoARFlow(model, init_loc_fn=init_loc_fn),
        PER_DRAW_LAPLACE: lambda: af.AutoARFlow(model, init_loc_fn=init_loc_fn, paths="laplace"),
    }


PRIOR_STRUCTURED = "AutoARFlow (prior-structured)"
PER_DRAW_LAPLACE = "AutoARFlow (per-draw Laplace)"


def chosen(
    guides: dict[str, Callable],
    names: list[str] | None,
    optional: dict[str, Callable] | None = None,
) -> dict[str, Callable]:
    """The guides ``names`` picks from ``guides`` and ``optional`` (by table name); without
    names, all of ``guides`` and none of ``optional``."""
    offered = {**guides, **(optional or {})}
    unknown = sorted(set(names or []) - set(offered))
    if unknown:
        raise SystemExit(f"unknown guides {unknown}; choose from {sorted(offered)}")
    if names is None:
        return dict(guides)
    return {name: make for name, make in offered.items() if name in names}


def save_figure(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()


def parse_study_args(
    description: str,
    default_steps: int,
    argv: Sequence[str] | None,
    guides_help: str = "fit only these guides (names as in the table)",
    flags: dict[str, str] | None = None,
    options: dict[str, tuple[int, str]] | None = None,
) -> argparse.Namespace:
    """:func:`parse_args` for an example scored against NUTS: it also takes
    ``--regenerate-reference``, ``--draws`` and ``--guides``."""
    return parse_args(
        description,
        default_steps,
        argv,
        flags={
            "--regenerate-reference": "rerun NUTS and rewrite the reference file, then stop",
            **(flags or {}),
        },
        options={**DRAWS_OPTION, **(options or {})},
        lists={"--guides": guides_help},
    )


@dataclass
class Chains:
    """NUTS draws of every latent site, shaped ``(chains, draws, *site_shape)``."""

    draws: dict[str, torch.Tensor]
    seconds: float
    divergences: int
    settings: dict[str, Any]

    def summary(self) -> dict[str, dict[str, list | float]]:
        """Per site: posterior mean and sd over all chains, worst R-hat and bulk ESS (ArviZ)."""
        import arviz as az

        data = az.from_dict(posterior={k: v.numpy() for k, v in self.draws.items()})
        rhat, ess = az.rhat(data), az.ess(data, method="bulk")
        return {
            name: {
                "mean": value.flatten(0, 1).mean(0).tolist(),
                "sd": value.flatten(0, 1).std(0).tolist(),
                "max_rhat": float(rhat[name].max()),
                "min_ess": float(ess[name].min()),
            }
            for name, value in self.draws.items()
        }


def run_nuts(
    model: Callable,
    data: tuple,
    chains: int,
    warmup: int,
    draws: int,
    seed: int,
    target_accept: float = 0.8,
) -> Chains:
    """``chains`` NUTS chains one after the other (seeds ``seed``, ``seed + 1``, ...), JIT-compiled.

    Sequential, so the seconds are those of one core doing all the work, comparable between
    samplers.
    """
    per_chain, divergences, seconds = [], 0, 0.0
    for chain in range(chains):
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(
            model, target_accept_prob=target_accept, jit_compile=True, ignore_jit_warnings=True
        )
        mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup)
        start = time.perf_counter()
        mcmc.run(*data)
        seconds += time.perf_counter() - start
        per_chain.append(mcmc.get_samples())
        divergences += len(mcmc.diagnostics()["divergences"]["chain 0"])
    stacked = {name: torch.stack([c[name] for c in per_chain]) for name in per_chain[0]}
    settings = {
        "seed": seed,
        "chains": chains,
        "warmup": warmup,
        "draws_per_chain": draws,
        "target_accept": target_accept,
    }
    return Chains(stacked, seconds, divergences, settings)


def write_reference(path: Path, run: Chains) -> None:
    """Save a NUTS run's summary (per site: mean, sd, worst R-hat, bulk ESS) and settings."""
    summary: dict[str, Any] = dict(run.summary())
    summary["settings"] = {
        **run.settings,
        "divergences": run.divergences,
        "seconds": round(run.seconds, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {path} ({summary['settings']})")
