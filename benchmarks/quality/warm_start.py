"""The Gaussian warm start: ``fit`` from the Laplace approximation against ``fit`` from the
guide as built, on models without latent paths.

    python benchmarks/quality/warm_start.py [--steps N] [--seed S] [--out DIR] [--draws N]

Models: Bayesian logistic regression (25 weights, 500 points, simulated), whose posterior is
close to Gaussian, and a banana (a Gaussian in x, y | x ~ N(x^2 / 2, 0.5^2)), whose posterior is
not. Guide: the default ``AutoARFlow``. Rows: how training ended, steps, seconds, the ELBO and
the median PSIS k-hat; and the ELBO after 100 steps, the "first steps" a user sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from _study import elbo_estimate, khat_median, parse_args, print_table, seed_everything

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


MODELS: dict[str, Callable[[], None]] = {"logistic regression": regression, "banana": banana}
FIRST_STEPS = 100


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(
        __doc__.splitlines()[0],
        default_steps=30000,
        argv=argv,
        options={"--draws": (4000, "guide draws for each k-hat")},
    )
    rows = []
    for model_name, model in MODELS.items():
        for warm in (True, False):
            seed_everything(args.seed)
            guide = af.AutoARFlow(model)
            af.fit(model, guide, max_steps=FIRST_STEPS, warm_start=warm, progress=False)
            first_elbo = elbo_estimate(model, guide, ())
            seed_everything(args.seed)
            guide = af.AutoARFlow(model)
            fit = af.fit(model, guide, max_steps=args.steps, warm_start=warm, progress=False)
            rows.append(
                {
                    "model": model_name,
                    "start": "Laplace" if warm else "as built",
                    f"ELBO after {FIRST_STEPS} steps": first_elbo,
                    "steps": fit.steps,
                    "converged": fit.status,
                    "seconds": fit.seconds,
                    "ELBO": elbo_estimate(model, guide, ()),
                    "PSIS k-hat (median of 5)": khat_median(model, guide, (), args.draws),
                }
            )
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
