"""Stochastic volatility: a guide that starts from the model's own latent path.

    python examples/stochastic_volatility.py [--seconds S] [--steps N] [--out DIR]

Returns r_t ~ Normal(0, exp(h_t / 2)), where the log-volatility h is an AR(1) path with unknown
persistence, mean and shock scale, declared as an ``af.GaussianPath``; 200 returns simulated
from persistence 0.95, mean -1, shock 0.25. Three guides train by ``af.fit`` under the same
time budget: Pyro's mean-field ``AutoNormal``, its full-rank ``AutoMultivariateNormal``, and
``af.AutoARFlow``, which draws the path by the prior's own flow plus a learned correction.
The table scores each against the simulated path (RMSE of the posterior mean, coverage of the
90% band) and gives its ELBO and PSIS k-hat; the figure shows the bands. The study that scores
these guides and more against NUTS is ``benchmarks/quality/stochastic_volatility.py``.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

import pyro_arflow as af


def model(returns: torch.Tensor) -> None:
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    mean = pyro.sample("mean", dist.Normal(-1.0, 2.0))
    shock = pyro.sample("shock", dist.HalfNormal(0.5))
    path = af.GaussianPath(
        lambda h, t: (mean + persistence * (h - mean), shock),  # transition(h_prev, t)
        dist.Normal(mean, shock / torch.sqrt(1 - persistence**2)),  # the first state
        len(returns),
    )
    log_vol = pyro.sample("log_vol", path)
    pyro.sample("returns", dist.Normal(0.0, torch.exp(log_vol / 2)).to_event(1), obs=returns)


def simulate(length: int = 200, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(true log-volatility, returns) from persistence 0.95, mean -1, shock 0.25."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.empty(length)
    h[0] = -1.0 + 0.25 / (1 - 0.95**2) ** 0.5 * torch.randn(1, generator=generator)
    for t in range(1, length):
        h[t] = -1.0 + 0.95 * (h[t - 1] + 1.0) + 0.25 * torch.randn(1, generator=generator)
    return h, torch.exp(h / 2) * torch.randn(length, generator=generator)


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoARFlow": af.AutoARFlow,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="training budget per guide")
    parser.add_argument("--steps", type=int, default=30000, help="most steps per guide")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for table, plot")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    true_log_vol, returns = simulate()
    rows, bands = [], {}
    for name, guide_class in GUIDES.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = guide_class(model)
        result = af.fit(model, guide, returns, max_steps=args.steps, max_seconds=args.seconds)
        with torch.no_grad():
            posterior = Predictive(model, guide=guide, num_samples=1000, parallel=True)(returns)
            elbo = -Trace_ELBO(num_particles=200, vectorize_particles=True).loss(
                model, guide, returns
            )
        draws, persistence = posterior["log_vol"].squeeze(1), posterior["persistence"]
        low, high = draws.quantile(torch.tensor([0.05, 0.95]), dim=0)
        bands[name] = (low, draws.mean(0), high)
        covered = (true_log_vol > low) & (true_log_vol < high)
        rows.append(
            {
                "guide": name,
                "status": result.status,
                "steps": result.steps,
                "ELBO": f"{elbo:.1f}",
                "k-hat": f"{af.psis_khat(model, guide, returns, num_particles=1000):.2f}",
                "path RMSE": f"{(draws.mean(0) - true_log_vol).pow(2).mean().sqrt():.3f}",
                "90% coverage": f"{covered.float().mean():.2f}",
                "persistence": f"{persistence.mean():.3f} ± {persistence.std():.3f}",
            }
        )
    table = markdown(rows)
    print(table)
    (args.out / "stochastic_volatility.md").write_text(table + "\n")
    plot(true_log_vol, bands, args.out / "stochastic_volatility.png")


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(map(str, row.values())) + " |" for row in rows])


def plot(truth: torch.Tensor, bands: dict, path: Path) -> None:
    figure, axes = plt.subplots(len(bands), 1, figsize=(9, 2.4 * len(bands)), sharex=True)
    for axis, (name, (low, mean, high)) in zip(axes, bands.items(), strict=True):
        axis.fill_between(range(len(truth)), low, high, alpha=0.3, label="90% band")
        axis.plot(mean, label="posterior mean")
        axis.plot(truth, "k", lw=0.8, label="true log-volatility")
        axis.set_title(name, fontsize=10)
    axes[0].legend(fontsize=8, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
