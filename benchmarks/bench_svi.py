"""Time per SVI step (Trace_ELBO, one particle) of flow guides against Pyro's.

    python benchmarks/bench_svi.py [--device cuda] [--no-validation]

1. A 100-dimensional latent model (Bayesian logistic regression, 100 weights, 1000 points):
   ``AutoARFlow("iaf")`` against Pyro's ``AutoIAFNormal`` at the same hidden sizes and number
   of layers (without the linear autoregressions ``"iaf"`` adds by default: the same
   architecture; a second row times the default), with ``AutoNormal`` as the floor.
2. A 2,000-step latent time series (a local-level model): ``AutoARFlow("iaf-lstm")`` against
   ``AutoNormal`` and ``AutoLowRankMultivariateNormal``.
3. A stochastic-volatility model whose 2,500-step path is an ``af.GaussianPath``: the
   prior-structured ``AutoARFlow`` (its default, and with each draw's own Laplace
   approximation, ``paths="laplace"``) against ``AutoNormal`` and the flat
   ``AutoARFlow("iaf-lstm", paths="flat")``.
4. A 1,000-step path of 2-vectors (a damped turn, its first coordinate seen through noise;
   damping and noise unknown): the prior-structured ``AutoARFlow`` and ``paths="laplace"``,
   whose block algebra now runs on 2 x 2 blocks, against ``AutoNormal``.

Guides take turns step by step, in a rotating order; medians are printed with ratios,
nothing is asserted. On a GPU (``--device cuda``) the model's data and every guide live there
(``torch.set_default_device``, so that Pyro's ``AutoIAFNormal`` builds its flow there too).
Pyro's validation is on unless ``--no-validation`` is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from _timing import describe_machine, interleaved_medians, warm_up
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoLowRankMultivariateNormal, AutoNormal
from pyro.optim import Adam

import pyro_arflow as af


def logistic_regression(features: torch.Tensor, labels: torch.Tensor) -> None:
    weights = pyro.sample("weights", dist.Normal(0.0, 1.0).expand([features.shape[-1]]).to_event(1))
    with pyro.plate("data", len(labels)):
        pyro.sample("y", dist.Bernoulli(logits=features @ weights), obs=labels)


def local_level(series: torch.Tensor) -> None:
    level_scale = pyro.sample("level_scale", dist.HalfNormal(1.0))
    noise_scale = pyro.sample("noise_scale", dist.HalfNormal(1.0))
    steps = pyro.sample("steps", dist.Normal(0.0, 1.0).expand([len(series)]).to_event(1))
    level = (level_scale * steps).cumsum(-1)
    pyro.sample("obs", dist.Normal(level, noise_scale.unsqueeze(-1)).to_event(1), obs=series)


class FlatAutoARFlow(af.AutoARFlow):
    """An ``AutoARFlow`` under its own name, so its parameters do not clash in the param store
    with the other ``AutoARFlow`` it is timed against."""


class LaplaceAutoARFlow(af.AutoARFlow):
    """The same, for the guide with each draw's Laplace approximation."""


def volatility(returns: torch.Tensor) -> None:
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    mean = pyro.sample("mean", dist.Normal(-1.0, 2.0))
    shock = pyro.sample("shock", dist.HalfNormal(0.5))
    path = af.GaussianPath(
        lambda h, t: (mean + persistence * (h - mean), shock),
        dist.Normal(mean, shock / torch.sqrt(1 - persistence**2)),
        len(returns),
    )
    log_vol = pyro.sample("log_vol", path)
    pyro.sample("returns", dist.Normal(0.0, torch.exp(log_vol / 2)).to_event(1), obs=returns)


def turning_state(observed: torch.Tensor) -> None:
    damping = pyro.sample("damping", dist.Uniform(0.5, 1.0))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    turn = damping[..., None, None] * torch.tensor([[0.96, 0.28], [-0.28, 0.96]])
    path = af.GaussianPath(
        lambda x, t: ((turn @ x.unsqueeze(-1)).squeeze(-1), torch.tensor([0.3, 0.3])),
        dist.Normal(torch.zeros(2), 1.0).to_event(1),
        len(observed),
    )
    state = pyro.sample("state", path)
    pyro.sample("y", dist.Normal(state[..., 0], noise.unsqueeze(-1)).to_event(1), obs=observed)


def ms_per_step(
    model: Callable,
    guides: dict[str, Callable[[], object]],
    data: tuple,
    steps: int,
    device: str,
) -> dict[str, float]:
    """Median ms of one SVI step for each guide, the guides stepping in turn.

    Each autoguide class names its own parameters, so they share one param store.
    """
    pyro.clear_param_store()
    svis = {
        name: SVI(model, make_guide(), Adam({"lr": 1e-3}), Trace_ELBO())
        for name, make_guide in guides.items()
    }
    return interleaved_medians(
        {name: partial(svi.step, *data) for name, svi in svis.items()}, steps, device
    )


def report(title: str, results: dict[str, float], reference: str) -> None:
    print(f"\n{title}")
    print(f"{'guide':44s} {'ms/step':>9s} {'x ' + reference:>20s}")
    for name, ms in results.items():
        print(f"{name:44s} {ms:9.2f} {ms / results[reference]:20.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False)"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_default_device(args.device)
    pyro.enable_validation(not args.no_validation)
    print(f"{describe_machine(args.device)}, pyro {pyro.__version__}")
    warm_up(args.device)
    print(f"Pyro validation {'off' if args.no_validation else 'on'}")

    features = torch.randn(1000, 100)
    labels = torch.bernoulli(torch.sigmoid(features @ (0.3 * torch.randn(100))))
    hidden = [args.hidden, args.hidden]
    results = ms_per_step(
        logistic_regression,
        {
            "AutoNormal (floor)": lambda: AutoNormal(logistic_regression),
            f"AutoIAFNormal(hidden={hidden}, 2 layers)": lambda: AutoIAFNormal(
                logistic_regression, hidden_dim=hidden, num_transforms=2
            ),
            f"AutoARFlow('iaf', hidden={hidden}, 2 layers)": lambda: af.AutoARFlow(
                logistic_regression,
                flow="iaf",
                num_flows=2,
                hidden_dims=hidden,
                linear_autoregression=False,  # the same architecture as AutoIAFNormal's
            ),
            "  + linear autoregressions (the 'iaf' default)": lambda: af.AutoARFlow(
                logistic_regression, flow="iaf", num_flows=2, hidden_dims=hidden
            ),
        },
        (features, labels),
        args.steps,
        args.device,
    )
    report(
        "100-dimensional latent (logistic regression)",
        results,
        f"AutoIAFNormal(hidden={hidden}, 2 layers)",
    )

    series = (0.1 * torch.randn(2000)).cumsum(0) + 0.5 * torch.randn(2000)
    results = ms_per_step(
        local_level,
        {
            "AutoNormal": lambda: AutoNormal(local_level),
            "AutoLowRankMultivariateNormal(rank=20)": lambda: AutoLowRankMultivariateNormal(
                local_level, rank=20
            ),
            "AutoARFlow('iaf-lstm', hidden 32, 2 layers)": lambda: af.AutoARFlow(
                local_level, flow="iaf-lstm", num_flows=2, hidden_size=32
            ),
        },
        (series,),
        max(5, args.steps // 4),
        args.device,
    )
    report("2,000-step latent time series (local level)", results, "AutoNormal")

    returns = torch.randn(2500) * 0.6
    results = ms_per_step(
        volatility,
        {
            "AutoNormal": lambda: AutoNormal(volatility),
            "AutoARFlow (prior-structured, the default)": lambda: af.AutoARFlow(volatility),
            "AutoARFlow(paths='laplace')": lambda: LaplaceAutoARFlow(volatility, paths="laplace"),
            "AutoARFlow('iaf-lstm', hidden 32, flat)": lambda: FlatAutoARFlow(
                volatility, flow="iaf-lstm", hidden_size=32, paths="flat"
            ),
        },
        (returns,),
        max(5, args.steps // 4),
        args.device,
    )
    report("2,500-step GaussianPath (stochastic volatility)", results, "AutoNormal")

    observed = torch.linspace(0, 60, 1000).sin() + 0.3 * torch.randn(1000)
    results = ms_per_step(
        turning_state,
        {
            "AutoNormal": lambda: AutoNormal(turning_state),
            "AutoARFlow (prior-structured, the default)": lambda: af.AutoARFlow(turning_state),
            "AutoARFlow(paths='laplace')": lambda: LaplaceAutoARFlow(
                turning_state, paths="laplace"
            ),
        },
        (observed,),
        max(5, args.steps // 4),
        args.device,
    )
    report("1,000-step GaussianPath of 2-vectors (a damped turn)", results, "AutoNormal")


if __name__ == "__main__":
    main()
