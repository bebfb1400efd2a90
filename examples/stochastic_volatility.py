"""Stochastic volatility: how much a flow guide buys over mean-field VI on a latent AR(1) path.

    python examples/stochastic_volatility.py [--steps N] [--seed S] [--out DIR]

The model (centered parametrization; Kim, Shephard and Chib 1998):

    persistence ~ Uniform(-1, 1),  mean ~ Normal(-1, 2),  shock ~ HalfNormal(0.5)
    h_1 ~ Normal(mean, shock / sqrt(1 - persistence^2))
    h_t ~ Normal(mean + persistence * (h_{t-1} - mean), shock)     t = 2..T
    r_t ~ Normal(0, exp(h_t / 2))

on T = 200 returns simulated from persistence 0.95, mean -1, shock 0.25 (a fixed seed, so
the data are the same on every run). The posterior over the 203 latents is strongly correlated
along the path, which a mean-field guide cannot represent. Five guides are fitted with the
same optimizer and steps; the table gives each one's ELBO (1000-particle estimate), PSIS
k-hat, fitting time, and how well it recovers the true log-volatility path (coverage of the
90% band, RMSE of the posterior mean). The plot draws each guide's volatility band against
the truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from _common import (
    AR1Path,
    comparison_guides,
    elbo_estimate,
    fit,
    parse_args,
    print_table,
    save_figure,
    seed_everything,
)
from pyro.infer import Predictive

import pyro_arflow as af

TRUE_PERSISTENCE, TRUE_MEAN, TRUE_SHOCK, NUM_RETURNS, DATA_SEED = 0.95, -1.0, 0.25, 200, 20261125


def model(returns: torch.Tensor) -> None:
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    mean = pyro.sample("mean", dist.Normal(-1.0, 2.0))
    shock = pyro.sample("shock", dist.HalfNormal(0.5))
    stationary_scale = shock / torch.sqrt(1 - persistence**2)
    log_vol = pyro.sample(
        "log_vol", AR1Path(mean, persistence, shock, stationary_scale, len(returns))
    )
    pyro.sample("returns", dist.Normal(0.0, torch.exp(log_vol / 2)).to_event(1), obs=returns)


def simulate() -> tuple[torch.Tensor, torch.Tensor]:
    """The true log-volatility path and the returns, from the fixed data seed."""
    with torch.random.fork_rng():
        torch.manual_seed(DATA_SEED)
        stationary_scale = TRUE_SHOCK / math.sqrt(1 - TRUE_PERSISTENCE**2)
        path = AR1Path(TRUE_MEAN, TRUE_PERSISTENCE, TRUE_SHOCK, stationary_scale, NUM_RETURNS)
        log_vol = path.sample()
        returns = torch.exp(log_vol / 2) * torch.randn(NUM_RETURNS)
    return log_vol, returns


GUIDES = comparison_guides(model)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(__doc__.splitlines()[0], default_steps=1500, argv=argv)
    true_log_vol, returns = simulate()
    rows, bands = [], {}
    for name, make_guide in GUIDES.items():
        seed_everything(args.seed)
        guide = make_guide()
        seconds = fit(model, guide, (returns,), args.steps, name)
        with torch.no_grad():
            draws = Predictive(
                model, guide=guide, num_samples=1000, parallel=True, return_sites=["log_vol"]
            )(returns)
        paths = draws["log_vol"].reshape(1000, NUM_RETURNS)
        low, median, high = torch.quantile(paths, torch.tensor([0.05, 0.5, 0.95]), dim=0)
        bands[name] = (low, median, high)
        rows.append(
            {
                "guide": name,
                "ELBO": elbo_estimate(model, guide, (returns,)),
                "PSIS k-hat": af.psis_khat(model, guide, returns, num_particles=1000),
                "seconds": seconds,
                "90% band coverage": ((true_log_vol >= low) & (true_log_vol <= high))
                .float()
                .mean()
                .item(),
                "path RMSE": math.sqrt(((paths.mean(0) - true_log_vol) ** 2).mean().item()),
            }
        )
    print_table(
        f"Stochastic volatility, T={NUM_RETURNS}, {args.steps} steps per guide (seed {args.seed})",
        rows,
        args.out,
        "stochastic_volatility",
    )
    plot(true_log_vol, returns, bands, args.out / "stochastic_volatility.png")
    return rows


def plot(true_log_vol, returns, bands, path) -> None:
    time = torch.arange(NUM_RETURNS).numpy()

    def volatility(log_vol: torch.Tensor):
        return torch.exp(log_vol / 2).numpy()

    figure, axes = plt.subplots(
        len(bands) + 1, 1, figsize=(10, 2.2 * (len(bands) + 1)), sharex=True
    )
    axes[0].plot(time, returns.numpy(), color="0.4", linewidth=0.8)
    axes[0].set_ylabel("return")
    axes[0].set_title("Simulated returns and each guide's 90% volatility band against the truth")
    for axis, (name, (low, median, high)) in zip(axes[1:], bands.items(), strict=True):
        axis.fill_between(time, volatility(low), volatility(high), alpha=0.35, label="90% band")
        axis.plot(time, volatility(median), linewidth=1.0, label="median")
        axis.plot(time, volatility(true_log_vol), color="black", linewidth=1.0, label="truth")
        axis.set_ylabel("volatility")
        axis.set_title(name, fontsize=9, loc="left")
    axes[1].legend(loc="upper right", fontsize=8, ncol=3)
    axes[-1].set_xlabel("t")
    save_figure(figure, path)


if __name__ == "__main__":
    main()
