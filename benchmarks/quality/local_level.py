"""Local-level model of the Nile's annual flow: five guides scored against NUTS.

    python benchmarks/quality/local_level.py [--steps N] [--seed S] [--out DIR] [--draws N]
    python benchmarks/quality/local_level.py --regenerate-reference   # reruns NUTS, new data file

The local level (random walk plus noise; Durbin and Koopman 2012, ch. 2), centered:

    start ~ Normal(10, 5),  level_scale ~ HalfNormal(2),  noise_scale ~ HalfNormal(4)
    level_1 ~ Normal(start, level_scale),  level_t ~ Normal(level_{t-1}, level_scale)
    flow_t ~ Normal(level_t, noise_scale)

on the Nile's volume at Aswan, 1871-1970, in units of 10^10 m^3 (the classic series in
10^8 m^3, divided by 100). The reference posterior is Pyro's NUTS (two chains, each 2000
draws after 500 warm-up steps at target acceptance 0.9, run on the non-centered form of the
same model, which has the same posterior), whose means and standard deviations live in
``data/nile_nuts_reference.json``; NUTS takes longer than the example's time budget, so the
option above regenerates the file. Every guide trains until its ELBO is flat, then anneals
(the rule is ``af.fit``'s). The table scores each guide against NUTS: the mean error
of the posterior means and the mean |log ratio| of the posterior sds, in NUTS sds, over all
103 latents and over the three globals.
"""

from __future__ import annotations

import json
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
    comparison_guides,
    fit_columns,
    guide_draws,
    parse_study_args,
    plot_elbo_traces,
    posterior_error,
    print_table,
    resampled_columns,
    run_nuts,
    save_figure,
    seed_everything,
    write_reference,
)
from pyro.infer.autoguide.initialization import init_to_median

import pyro_arflow as af

# Annual flow volume of the Nile at Aswan, 1871-1970, 10^8 m^3 (Cobb 1978; Durbin and
# Koopman 2012). A public-domain series, shipped with R as `datasets::Nile`.
# fmt: off
NILE = [
    1120, 1160, 963, 1210, 1160, 1160, 813, 1230, 1370, 1140, 995, 935, 1110, 994, 1020, 960,
    1180, 799, 958, 1140, 1100, 1210, 1150, 1250, 1260, 1220, 1030, 1100, 774, 840, 874, 694,
    940, 833, 701, 916, 692, 1020, 1050, 969, 831, 726, 456, 824, 702, 1120, 1100, 832, 764,
    821, 768, 845, 864, 862, 698, 845, 744, 796, 1040, 759, 781, 865, 845, 944, 984, 897, 822,
    1010, 771, 676, 649, 846, 812, 742, 801, 1040, 860, 874, 848, 890, 744, 749, 838, 1050, 918,
    986, 797, 923, 975, 815, 1020, 906, 901, 1170, 912, 746, 919, 718, 714, 740,
]
# fmt: on
FLOW = torch.tensor(NILE, dtype=torch.float32) / 100.0
YEARS = torch.arange(1871, 1971)
REFERENCE = Path(__file__).parent / "data" / "nile_nuts_reference.json"
GLOBALS = ("start", "level_scale", "noise_scale")


def model(flow: torch.Tensor) -> None:
    start = pyro.sample("start", dist.Normal(10.0, 5.0))
    level_scale = pyro.sample("level_scale", dist.HalfNormal(2.0))
    noise_scale = pyro.sample("noise_scale", dist.HalfNormal(4.0))
    walk = af.GaussianPath(
        lambda x, t: (x, level_scale), dist.Normal(start, level_scale), len(flow)
    )
    level = pyro.sample("level", walk)
    pyro.sample("flow", dist.Normal(level, noise_scale.unsqueeze(-1)).to_event(1), obs=flow)


def non_centered_model(flow: torch.Tensor) -> None:
    """The same joint distribution, the level written as start + cumsum(level_scale * steps):
    the same posterior, in a geometry NUTS explores far faster."""
    start = pyro.sample("start", dist.Normal(10.0, 5.0))
    level_scale = pyro.sample("level_scale", dist.HalfNormal(2.0))
    noise_scale = pyro.sample("noise_scale", dist.HalfNormal(4.0))
    steps = pyro.sample("steps", dist.Normal(torch.zeros(len(flow)), 1.0).to_event(1))
    level = non_centered_level(start, level_scale, steps)
    pyro.sample("flow", dist.Normal(level, noise_scale.unsqueeze(-1)).to_event(1), obs=flow)


def non_centered_level(start, level_scale, steps) -> torch.Tensor:
    return start.unsqueeze(-1) + (level_scale.unsqueeze(-1) * steps).cumsum(-1)


def regenerate_reference(seed: int, chains: int = 2, warmup: int = 500, draws: int = 2000):
    run = run_nuts(non_centered_model, (FLOW,), chains, warmup, draws, seed, target_accept=0.9)
    run.draws["level"] = non_centered_level(
        run.draws["start"], run.draws["level_scale"], run.draws.pop("steps")
    )
    write_reference(REFERENCE, run)


def init_level_at_flow(site: dict) -> torch.Tensor:
    """The level path at the observations, every other site at its prior median.

    Pyro's ``init_to_median`` leaves vector sites at zero (it has no median for them); a
    state-space path is better started at the observations, the usual practice, for every
    guide alike. A fresh copy at every call: Pyro's ``AutoNormal`` trains the tensor it is
    given in place, so with one shared copy (``init_to_value``) every guide fitted after it
    would start where it finished.
    """
    if site["name"] == "level":
        return FLOW.clone()
    return init_to_median(site)


GUIDES = comparison_guides(model, init_loc_fn=init_level_at_flow)
OPTIONAL_GUIDES = {
    "AutoARFlow('iaf-lstm', linear, flat)": lambda: af.AutoARFlow(
        model,
        flow="iaf-lstm",
        hidden_size=32,
        linear_autoregression=True,
        init_loc_fn=init_level_at_flow,
        paths="flat",
    )
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_study_args(
        __doc__.splitlines()[0],
        default_steps=30000,
        argv=argv,
        guides_help="fit only these guides (names as in the table; also "
        + ", ".join(OPTIONAL_GUIDES)
        + ")",
    )
    if args.regenerate_reference:
        regenerate_reference(args.seed)
        return []
    reference = json.loads(REFERENCE.read_text())
    settings = reference["settings"]
    nuts_level = torch.tensor(reference["level"]["mean"]), torch.tensor(reference["level"]["sd"])
    rows, bands, fits = [], {}, {}
    for name, make_guide in chosen(GUIDES, args.guides, OPTIONAL_GUIDES).items():
        seed_everything(args.seed)
        guide = make_guide()
        fit = fits[name] = af.fit(model, guide, FLOW, max_steps=args.steps, progress=False)
        if fit.diverged:  # nothing to score: the row says so
            rows.append({"method": name, **fit_columns(fit, model, guide, (FLOW,), args.draws)})
            continue
        draws = guide_draws(model, guide, (FLOW,), args.draws, ["level", *GLOBALS])
        bands[name] = torch.quantile(draws["level"], torch.tensor([0.05, 0.95]), dim=0)
        error, log_sd = posterior_error(draws, reference, ["level", *GLOBALS])
        level_error, level_log_sd = posterior_error(draws, reference, ["level"])
        globals_error, globals_log_sd = posterior_error(draws, reference, GLOBALS)
        rows.append(
            {
                "method": name,
                **fit_columns(fit, model, guide, (FLOW,), args.draws),
                "mean err (sd)": error,
                "log-sd err": log_sd,
                "level mean err (sd)": level_error,
                "level log-sd err": level_log_sd,
                "globals mean err (sd)": globals_error,
                "globals log-sd err": globals_log_sd,
                **resampled_columns(model, guide, (FLOW,), args.draws, reference, GLOBALS),
            }
        )
    print_table(
        f"Nile local level, guides trained until flat (at most {args.steps} steps, seed "
        f"{args.seed}); NUTS: {settings['chains']} chains x {settings['draws_per_chain']} draws",
        rows,
        args.out,
        "quality_local_level",
    )
    plot(nuts_level, bands, fits, args.out / "quality_local_level.png")
    return rows


def plot(nuts_level, bands, fits, path) -> None:
    mean, sd = (t.numpy() for t in nuts_level)
    years, flow = YEARS.numpy(), FLOW.numpy()
    figure, axes = plt.subplots(len(bands) + 1, 1, figsize=(10, 2.3 * (len(bands) + 1)))
    plot_elbo_traces(axes[0], fits)
    for axis, (name, (low, high)) in zip(axes[1:], bands.items(), strict=True):
        axis.scatter(years, flow, s=6, color="0.5", label="flow")
        axis.fill_between(years, low.numpy(), high.numpy(), alpha=0.35, label=f"{name} 90% band")
        axis.plot(years, mean - 1.645 * sd, "k--", linewidth=0.8, label="NUTS 90% band")
        axis.plot(years, mean + 1.645 * sd, "k--", linewidth=0.8)
        axis.set_ylabel("10^10 m^3")
        axis.legend(loc="upper right", fontsize=7, ncol=3)
    axes[1].set_title("Nile flow: each guide's level band against NUTS")
    axes[-1].set_xlabel("year")
    save_figure(figure, path)


if __name__ == "__main__":
    # These models are small: one torch thread steps them faster than two (the 2500-step
    # LSTM guide: 27 steps per second against 13), and leaves a core to the next job.
    torch.set_num_threads(1)
    main()
