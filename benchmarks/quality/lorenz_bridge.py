"""A stochastic Lorenz-63 bridge: guides that start from the model against flat ones, and NUTS.

    python benchmarks/quality/lorenz_bridge.py [--steps N] [--seed S] [--out DIR] [--draws N]
        [--guides ...]
    python benchmarks/quality/lorenz_bridge.py --regenerate-reference  # reruns NUTS, new data file

The model (Euler-Maruyama steps of the Lorenz-63 system with noise; 30 states of 3 coordinates,
90 latents, no globals):

    s_0 ~ Normal((0, 0, 25), 5)
    s_t ~ Normal(s_{t-1} + dt * lorenz(s_{t-1}), noise * sqrt(dt))    t = 1..29
    x-coordinate observed with sd 1 at t = 0..9 and 20..29; the middle third is missing

declared as one ``af.GaussianPath`` site. The data are simulated from a start on the attractor
(a fixed seed). The reference posterior is NUTS on the non-centered form of the same model
(start and standardized innovations as latents; 2 chains of 1500 draws, summary in
``data/lorenz_nuts_reference.json``). Every guide trains with ``af.fit``; the table scores the
posterior means and sds of all 90 latents against NUTS, in NUTS sds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from _study import (
    chosen,
    fit_columns,
    guide_draws,
    parse_study_args,
    plot_elbo_traces,
    posterior_error,
    print_table,
    run_nuts,
    save_figure,
    seed_everything,
    write_reference,
)
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoStructured,
)

import pyro_arflow as af

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0
DT, NOISE, OBSERVATION_SD, STATES = 0.02, 2.0, 1.0, 30
INITIAL_LOC, INITIAL_SD = torch.tensor([0.0, 0.0, 25.0]), 5.0
DATA_SEED = 20261201
REFERENCE = Path(__file__).parent / "data" / "lorenz_nuts_reference.json"
OBSERVED = (torch.arange(STATES) < STATES // 3) | (torch.arange(STATES) >= 2 * STATES // 3)


def lorenz(state: torch.Tensor) -> torch.Tensor:
    x, y, z = state.unbind(-1)
    return torch.stack([SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z], dim=-1)


def transition(previous: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
    return previous + DT * lorenz(previous), NOISE * math.sqrt(DT)


def model(x_observed: torch.Tensor) -> None:
    initial = dist.Normal(INITIAL_LOC, INITIAL_SD).to_event(1)
    path = pyro.sample("path", af.GaussianPath(transition, initial, STATES))
    likelihood = dist.Normal(path[..., 0], OBSERVATION_SD).mask(OBSERVED).to_event(1)
    pyro.sample("x", likelihood, obs=x_observed)


def non_centered_model(x_observed: torch.Tensor) -> None:
    """The same posterior with the start and the standardized innovations as latents."""
    start = pyro.sample("start", dist.Normal(INITIAL_LOC, INITIAL_SD).to_event(1))
    noise = pyro.sample("innovations", dist.Normal(torch.zeros(STATES - 1, 3), 1.0).to_event(2))
    likelihood = dist.Normal(path_from_noise(start, noise)[..., 0], OBSERVATION_SD)
    pyro.sample("x", likelihood.mask(OBSERVED).to_event(1), obs=x_observed)


def path_from_noise(start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The path from its start and standardized innovations, step by step."""
    states = [start]
    for t in range(1, STATES):
        loc, scale = transition(states[-1], torch.tensor(t))
        states.append(loc + scale * noise[..., t - 1, :])
    return torch.stack(states, dim=-2)


def simulate() -> tuple[torch.Tensor, torch.Tensor]:
    """The true path (from a point on the attractor) and its noisy x (0 where missing)."""
    with torch.random.fork_rng():
        torch.manual_seed(DATA_SEED)
        state = torch.tensor([1.0, 1.0, 1.0])
        for _ in range(2000):  # onto the attractor
            state = state + 0.005 * lorenz(state)
        truth = af.GaussianPath(transition, dist.Normal(state, 1e-6).to_event(1), STATES).sample()
        x_observed = truth[:, 0] + OBSERVATION_SD * torch.randn(STATES)
    return truth, torch.where(OBSERVED, x_observed, torch.zeros(()))


GUIDES = {
    "AutoNormal": lambda: AutoNormal(model),
    "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model),
    "Pyro AutoStructured (mvn)": lambda: AutoStructured(model, conditionals="mvn"),
    "Pyro AutoIAFNormal": lambda: AutoIAFNormal(model, hidden_dim=[256], num_transforms=2),
    "AutoARFlow(paths='flat')": lambda: af.AutoARFlow(model, hidden_dims=[256], paths="flat"),
    "AutoARFlow (prior-structured)": lambda: af.AutoARFlow(model),
}


def regenerate_reference(seed: int) -> None:
    _, x_observed = simulate()
    run = run_nuts(non_centered_model, (x_observed,), 2, 1000, 1500, seed, target_accept=0.9)
    run.draws["path"] = path_from_noise(run.draws.pop("start"), run.draws.pop("innovations"))
    write_reference(REFERENCE, run)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_study_args(__doc__.splitlines()[0], default_steps=10000, argv=argv)
    if args.regenerate_reference:
        regenerate_reference(args.seed)
        return []
    truth, x_observed = simulate()
    reference = json.loads(REFERENCE.read_text())
    rows, fits, means = [], {}, {}
    for name, make_guide in chosen(GUIDES, args.guides).items():
        seed_everything(args.seed)
        guide = make_guide()
        fit = fits[name] = af.fit(model, guide, x_observed, max_steps=args.steps, progress=False)
        row = {"guide": name, **fit_columns(fit, model, guide, (x_observed,), args.draws)}
        if not fit.diverged:
            draws = guide_draws(model, guide, (x_observed,), args.draws, ["path"])
            means[name] = draws["path"].mean(0).reshape(STATES, 3)
            error, log_sd = posterior_error(draws, reference, ["path"])
            row.update({"mean err (sd)": error, "log-sd err": log_sd})
        rows.append(row)
    print_table(
        f"Lorenz-63 bridge, {STATES} states x 3, middle third missing; guides trained by af.fit "
        f"(at most {args.steps} steps, seed {args.seed}); scored against NUTS",
        rows,
        args.out,
        "quality_lorenz_bridge",
    )
    plot(truth, x_observed, torch.tensor(reference["path"]["mean"]), means, fits, args.out)
    return rows


def plot(truth, x_observed, nuts_mean, means, fits, out: Path) -> None:
    figure, axes = plt.subplots(4, 1, figsize=(10, 10))
    plot_elbo_traces(axes[0], fits, span=500.0)  # the flat guides end hundreds of nats below
    time = torch.arange(STATES).numpy()
    for coordinate, axis in enumerate(axes[1:]):
        axis.plot(time, truth[:, coordinate].numpy(), color="black", linewidth=1.0, label="truth")
        axis.plot(time, nuts_mean[:, coordinate].numpy(), "k--", linewidth=1.0, label="NUTS mean")
        for name, mean in means.items():
            axis.plot(time, mean[:, coordinate].numpy(), linewidth=0.9, label=name)
        if coordinate == 0:
            axis.scatter(time[OBSERVED], x_observed[OBSERVED].numpy(), s=8, color="0.4")
        axis.set_ylabel("xyz"[coordinate])
    axes[1].set_title("Posterior means of the path against NUTS (dots: the observed x)")
    axes[2].legend(fontsize=7, ncol=2, loc="lower right")  # where no path runs
    axes[-1].set_xlabel("t")
    save_figure(figure, out / "quality_lorenz_bridge.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
