"""The Gaussian warm start: ``fit`` from the Laplace approximation against ``fit`` from the
guide as built, on models without latent paths and on the latent-path benchmarks.

    python benchmarks/quality/warm_start.py [--steps N] [--seed S] [--out DIR] [--draws N]

Models without paths: Bayesian logistic regression (25 weights, 500 points, simulated), whose
posterior is close to Gaussian, and a banana (a Gaussian in x, y | x ~ N(x^2 / 2, 0.5^2)),
whose posterior is not; the Laplace approximation is the joint one. With paths, the
prior-structured guide on the Lorenz-63 bridge, the Nile local level and the volatility model
(T = 200), warm-started at each path's Laplace approximation given the initial globals, or
started as built (the prior's free path); these are scored against their NUTS references too.
Guide: the default ``AutoARFlow``. Rows: how training ended, steps, seconds, the ELBO and the
median PSIS k-hat; and the ELBO after 100 steps, the "first steps" a user sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import seeds
import torch
from _study import (
    elbo_estimate,
    guide_draws,
    khat_median,
    parse_args,
    posterior_error,
    print_table,
    seed_everything,
)

import pyro_arflow as af

GENERATOR = torch.Generator().manual_seed(20261201)
FEATURES = torch.randn(500, 25, generator=GENERATOR)
LABELS = (
    torch.rand(500, generator=GENERATOR)
    < torch.sigmoid(FEATURES @ torch.randn(25, generator=GENERATOR))
).float()


def regression() -> None:
    weights = pyro.sample("w", dist.Normal(torch.zeros(25), 1.0).to_event(1))
    logits = torch.einsum("nd,...d->...n", FEATURES, weights)
    pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=LABELS)


def banana() -> None:
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(x**2 / 2, 0.5))


MODELS: dict[str, tuple[Callable, tuple, Path | None]] = {
    "logistic regression": (regression, (), None),
    "banana": (banana, (), None),
    **{
        name: seeds.MODELS[name][:3]  # model, arguments, NUTS reference
        for name in ("Lorenz bridge", "Nile local level", "volatility (T=200)")
    },
}
"""name: (model, its arguments, its NUTS reference or None)."""
FIRST_STEPS = 100


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(
        __doc__.splitlines()[0],
        default_steps=30000,
        argv=argv,
        options={"--draws": (4000, "guide draws for each k-hat")},
    )
    rows = []
    for model_name, (model, data, reference) in MODELS.items():
        for warm in (True, False):
            seed_everything(args.seed)
            guide = af.AutoARFlow(model)
            af.fit(model, guide, *data, max_steps=FIRST_STEPS, warm_start=warm, progress=False)
            first_elbo = elbo_estimate(model, guide, data)
            seed_everything(args.seed)
            guide = af.AutoARFlow(model)
            fit = af.fit(model, guide, *data, max_steps=args.steps, warm_start=warm, progress=False)
            row = {
                "model": model_name,
                "start": "Laplace" if warm else "as built",
                f"ELBO after {FIRST_STEPS} steps": first_elbo,
                "steps": fit.steps,
                "converged": fit.status,
                "seconds": fit.seconds,
                "ELBO": elbo_estimate(model, guide, data),
                "PSIS k-hat (median of 5)": khat_median(model, guide, data, args.draws),
            }
            if reference is not None:
                summary = json.loads(reference.read_text())
                sites = [name for name in summary if name != "settings"]
                draws = guide_draws(model, guide, data, args.draws, sites)
                error, log_sd = posterior_error(draws, summary, sites)
                row.update({"mean err (sd)": error, "log-sd err": log_sd})
            rows.append(row)
            print(rows[-1], flush=True)
    print_table(
        f"The Laplace warm start, default AutoARFlow trained by af.fit (at most {args.steps} "
        f"steps, seed {args.seed})",
        rows,
        args.out,
        "quality_warm_start",
    )
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
