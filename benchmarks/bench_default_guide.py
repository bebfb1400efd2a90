"""The default ``AutoARFlow(model)`` as the number of latents grows: what it builds, its
parameters, its SVI step, against the masked ``"iaf"`` named by hand and ``AutoNormal``.

    python benchmarks/bench_default_guide.py [--dims 100 1000 2000 10000] [--device cuda]

The model: Bayesian logistic regression with D weights on 200 points (no latent path, so
every latent is in the flow). Step: ``Trace_ELBO``, one particle, Adam; the median of 15 steps,
the guides taking turns (after two untimed steps each). The masked ``"iaf"`` by hand is timed up to
D = 2000 (at 10000 its default width would hold 2 billion parameters). Nothing is asserted.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from _timing import describe_machine, interleaved_medians, warm_up
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

import pyro_arflow as af
from pyro_arflow.guides import default_flow


def regression(features: torch.Tensor, labels: torch.Tensor) -> None:
    weights = pyro.sample("w", dist.Normal(0.0, 1.0).expand([features.shape[-1]]).to_event(1))
    with pyro.plate("data", len(labels)):
        pyro.sample("y", dist.Bernoulli(logits=features @ weights), obs=labels)


class MaskedByHand(af.AutoARFlow):
    """An ``AutoARFlow`` under its own name (its own param-store names)."""


def stepper(guide: Callable, data: tuple) -> Callable[[], None]:
    svi = SVI(regression, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(*data)
    return lambda: svi.step(*data)


def describe(guide: af.AutoARFlow) -> str:
    parts = []
    for module in guide.flow.modules():
        if isinstance(module, af.LinearAutoregression):
            parts.append("dense linear" if module.bandwidth is None else f"band {module.bandwidth}")
        elif isinstance(module, af.MaskedConditioner | af.ConvConditioner):
            parts.append(type(module).__name__.replace("Conditioner", "").lower())
    return "+".join(dict.fromkeys(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 1000, 2000, 10000])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_default_device(args.device)
    print(describe_machine(args.device))
    header = f"{'D':>6} {'default flow':>34} {'parameters':>11} {'ms/step':>9} {'x AutoNormal':>13}"
    print(header + f" {'masked iaf by hand':>19}")
    for dim in args.dims:
        pyro.clear_param_store()
        generator = torch.Generator().manual_seed(dim)
        features = (torch.randn(200, dim, generator=generator) / dim**0.5).to(args.device)
        labels = (torch.rand(200, generator=generator) < 0.5).float().to(args.device)
        data = (features, labels)
        default = af.AutoARFlow(regression)
        steps = {
            "default": stepper(default, data),
            "AutoNormal": stepper(AutoNormal(regression), data),
        }
        if dim <= 2000:
            steps["by hand"] = stepper(MaskedByHand(regression, flow="iaf"), data)
        warm_up(args.device)
        medians = interleaved_medians(steps, 15, args.device)  # ms
        name, kwargs = default_flow(dim)
        flow = f"{name} {kwargs}" if kwargs else name
        count = sum(p.numel() for p in default.parameters())
        by_hand = f"{medians['by hand']:8.1f} ms" if "by hand" in medians else f"{'-':>11}"
        print(
            f"{dim:>6} {describe(default) + ' (' + flow.split()[0] + ')':>34} "
            f"{count / 1e6:>10.2f}M {medians['default']:>9.1f} "
            f"{medians['default'] / medians['AutoNormal']:>13.1f} {by_hand:>19}"
        )


if __name__ == "__main__":
    main()
