"""What the examples share: command line, fits with a progress bar, ELBO estimates, tables."""

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
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro.distributions import constraints
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from pyro.optim import ClippedAdam, PyroOptim
from tqdm.auto import tqdm

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


@dataclass
class Fit:
    """One guide's training: the ELBO estimate of every step, the time, how it ended.

    ``flat_at`` is the step at which the ELBO was flat by the rule (``None`` if the budget ran
    out first); the annealing steps follow it and are counted in ``steps``.
    """

    elbo: list[float]
    seconds: float
    flat_at: int | None
    diverged: bool = False

    @property
    def status(self) -> str:
        if self.diverged:
            return f"diverged (step {self.steps + 1})"
        return "no (budget)" if self.flat_at is None else f"yes (flat at {self.flat_at})"

    @property
    def steps(self) -> int:
        return len(self.elbo)

    def smoothed(self, window: int) -> tuple[list[int], list[float]]:
        """Mean ELBO of each full window of steps, at the window's last step."""
        means = torch.tensor(self.elbo[: self.steps // window * window]).view(-1, window).mean(1)
        return [window * (k + 1) for k in range(len(means))], means.tolist()


CONVERGENCE_WINDOW, CONVERGENCE_WINDOWS, CONVERGENCE_SLOPE = 250, 16, 0.25
ANNEAL_STEPS, ANNEAL_DECAY = 2000, 0.1


def elbo_trend(elbo: Sequence[float]) -> float:
    """Nats gained per 1000 steps: the least-squares slope through the means of the last
    ``CONVERGENCE_WINDOWS`` windows of ``CONVERGENCE_WINDOW`` steps."""
    span = CONVERGENCE_WINDOW * CONVERGENCE_WINDOWS
    means = torch.tensor(elbo[-span:], dtype=torch.float64).view(CONVERGENCE_WINDOWS, -1).mean(1)
    steps = torch.arange(CONVERGENCE_WINDOWS, dtype=torch.float64) * CONVERGENCE_WINDOW
    steps, means = steps - steps.mean(), means - means.mean()
    return 1000 * float((steps * means).sum() / (steps * steps).sum())


def train(
    model: Callable,
    guide: Callable,
    data: tuple,
    max_steps: int,
    label: str,
    lr: float = 0.01,
    particles: int = 4,
) -> Fit:
    """Train until the ELBO stops improving, then anneal; at most ``max_steps`` steps in all.

    The optimizer is ClippedAdam (gradient norm clipped at 10), the same schedule for every
    guide, in two phases:

    1. Until flat: the learning rate decays 10x over ``max_steps``. Every 250 steps, once 4000
       are done, fit a line through the mean ELBOs of the last 16 windows of 250 steps; the
       phase ends when it rises by less than 0.25 nats per 1000 steps, or when only the
       annealing steps are left of the budget. (With 4 particles a window's mean is uncertain
       by about 0.3 nats, the slope by about 0.07 nats per 1000 steps, so a guide still
       climbing at 0.25 is seen to climb. A rule comparing windows with the best one so far
       stops too early: the best is biased upward by the noise.)
    2. Anneal: ``min(2000, max_steps // 5)`` more steps, the learning rate decaying another
       10x. A flat trace says the optimizer no longer gains on average, not that the
       parameters stand still: at the rule's stop they wander at the learning rate of the
       moment, and so do the posterior means they give. (Stochastic volatility, LSTM guide,
       against the target-0.9 NUTS reference: mean error 0.101 NUTS sd at the rule's stop,
       0.068 after the anneal.)

    A guide whose training diverges (a non-finite loss, or the ``ValueError`` Pyro's or this
    package's validation raises for one) stops there, marked ``diverged``: a comparison should
    show a baseline that fails, not crash on it.
    """
    anneal = min(ANNEAL_STEPS, max_steps // 5)
    optimizer = ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / max(max_steps, 1)), "clip_norm": 10.0})
    svi = SVI(
        model, guide, optimizer, Trace_ELBO(num_particles=particles, vectorize_particles=True)
    )
    elbo: list[float] = []
    flat_at: int | None = None
    start = time.perf_counter()
    with tqdm(total=max_steps, desc=f"{label:>28s}", leave=False) as bar:

        def step() -> bool:
            """One SVI step; False (nothing recorded) if its loss is not finite."""
            try:
                loss = svi.step(*data)
            except ValueError:
                loss = math.nan
            if math.isfinite(loss):
                elbo.append(-loss)
                bar.update()
            return math.isfinite(loss)

        while len(elbo) < max_steps - anneal and flat_at is None:
            if not step():
                return Fit(elbo, time.perf_counter() - start, flat_at, diverged=True)
            if len(elbo) % CONVERGENCE_WINDOW == 0:
                window = sum(elbo[-CONVERGENCE_WINDOW:]) / CONVERGENCE_WINDOW
                bar.set_postfix(elbo=f"{window:.1f}")
                span = CONVERGENCE_WINDOW * CONVERGENCE_WINDOWS
                if len(elbo) >= span and elbo_trend(elbo) < CONVERGENCE_SLOPE:
                    flat_at = len(elbo)
        _set_decay(optimizer, ANNEAL_DECAY ** (1 / max(anneal, 1)))
        for _ in range(anneal):
            if not step():
                return Fit(elbo, time.perf_counter() - start, flat_at, diverged=True)
    return Fit(elbo, time.perf_counter() - start, flat_at)


def _set_decay(optimizer: PyroOptim, per_step: float) -> None:
    """From now on, every parameter's learning rate is multiplied by ``per_step`` each step."""
    for parameter_optimizer in optimizer.optim_objs.values():
        for group in parameter_optimizer.param_groups:
            group["lrd"] = per_step


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


def plot_elbo_traces(axis: Any, fits: dict[str, Fit]) -> None:
    """Each guide's ELBO, averaged over windows of 250 steps (fewer for short smoke runs),
    against the step; the vertical range is the top 40 nats, where the guides finish."""
    finished = [fit.steps for fit in fits.values() if not fit.diverged] or [CONVERGENCE_WINDOW]
    window = max(1, min(CONVERGENCE_WINDOW, min(finished) // 4))
    for name, fit in fits.items():
        label = f"{name} ({fit.status if fit.diverged else f'{fit.steps} steps'})"
        axis.plot(*fit.smoothed(window), label=label, linewidth=1.0)
    top = max(max(fit.smoothed(window)[1], default=-math.inf) for fit in fits.values())
    axis.set_ylim(top - 40, top + 5)
    axis.set_title("ELBO while training: until flat by the rule or out of budget, then annealed")
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
    return {site: value.reshape(draws, -1).squeeze(-1) for site, value in values.items()}


def fit_columns(
    fit: Fit, model: Callable, guide: Callable, data: tuple, draws: int
) -> dict[str, Any]:
    """The columns every guide's row starts with: steps and how training ended, then (unless it
    diverged, leaving nothing to score) seconds, ELBO and k-hat."""
    columns: dict[str, Any] = {"steps": fit.steps, "converged": fit.status}
    if not fit.diverged:
        columns["seconds"] = fit.seconds
        columns["ELBO"] = elbo_estimate(model, guide, data)
        columns[f"PSIS k-hat (median of {KHAT_REPEATS})"] = khat_median(model, guide, data, draws)
    return columns


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
    Pyro's IAF guide, and ours with a masked and with an LSTM conditioner (same widths).

    All start from ``init_loc_fn`` but Pyro's ``AutoIAFNormal``, which ignores it (it starts
    at N(0, I) in the unconstrained space).
    """
    return {
        "AutoNormal": lambda: AutoNormal(model, init_loc_fn=init_loc_fn),
        "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model, init_loc_fn=init_loc_fn),
        "Pyro AutoIAFNormal": lambda: AutoIAFNormal(model, hidden_dim=[256], num_transforms=2),
        "AutoARFlow('iaf')": lambda: af.AutoARFlow(
            model, flow="iaf", num_flows=2, hidden_dims=[256], init_loc_fn=init_loc_fn
        ),
        "AutoARFlow('iaf-lstm')": lambda: af.AutoARFlow(
            model, flow="iaf-lstm", num_flows=2, hidden_size=32, init_loc_fn=init_loc_fn
        ),
    }


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


class AR1Path(dist.TorchDistribution):
    """A Gaussian AR(1) path h_1..h_T as one distribution (event shape (T,)):

        h_1 ~ Normal(loc, initial_scale),  h_t ~ Normal(loc + coefficient (h_{t-1} - loc), scale).

    coefficient in (-1, 1) with initial_scale = scale / sqrt(1 - coefficient^2) is the
    stationary AR(1); coefficient = 1 with initial_scale = scale is a random walk from loc.
    """

    arg_constraints = {
        "loc": constraints.real,
        "coefficient": constraints.real,
        "scale": constraints.positive,
        "initial_scale": constraints.positive,
    }
    support = constraints.real_vector

    def __init__(
        self, loc, coefficient, scale, initial_scale, length: int, validate_args=None
    ) -> None:
        params = torch.broadcast_tensors(
            *(
                torch.as_tensor(p, dtype=torch.get_default_dtype())
                for p in (loc, coefficient, scale, initial_scale)
            )
        )
        self.loc, self.coefficient, self.scale, self.initial_scale = params
        self.length = length
        super().__init__(self.loc.shape, torch.Size([length]), validate_args)

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        loc, coefficient, scale, initial_scale = (
            p.unsqueeze(-1) for p in (self.loc, self.coefficient, self.scale, self.initial_scale)
        )
        previous = torch.cat([loc.expand(h.shape[:-1] + (1,)), h[..., :-1]], dim=-1)
        first = torch.arange(self.length, device=h.device) == 0
        conditional = dist.Normal(
            loc + coefficient * (previous - loc), torch.where(first, initial_scale, scale)
        )
        return conditional.log_prob(h).sum(-1)

    def path(self, innovations: torch.Tensor) -> torch.Tensor:
        """The path whose standardized innovations are ``innovations`` (shape ``(..., T)``):

            h_t - loc = sum_{k <= t} coefficient^(t - k) s_k e_k,
            s_1 = initial_scale, s_k = scale (k > 1),

        one triangular matrix product (O(T^2), no loop over t): the non-centered form of the
        same distribution, in which NUTS mixes far faster.
        """
        loc, coefficient, scale, initial_scale = (
            p.unsqueeze(-1) for p in (self.loc, self.coefficient, self.scale, self.initial_scale)
        )
        time = torch.arange(self.length, device=innovations.device)
        first = time == 0
        lag = (time[:, None] - time[None, :]).clamp(min=0).to(innovations.dtype)
        powers = coefficient.unsqueeze(-1) ** lag * (time[:, None] >= time[None, :])
        shocks = torch.where(first, initial_scale, scale) * innovations
        return loc + (powers @ shocks.unsqueeze(-1)).squeeze(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.path(torch.randn(self._extended_shape(sample_shape)))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AR1Path, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.coefficient, new.scale, new.initial_scale = (
            p.expand(batch_shape)
            for p in (self.loc, self.coefficient, self.scale, self.initial_scale)
        )
        new.length = self.length
        super(AR1Path, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


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
