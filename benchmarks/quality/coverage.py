"""Calibration over data sets: each guide's 90% band coverage of the true path, beside NUTS's.

    python benchmarks/quality/coverage.py [--length T] [--datasets K] [--guides NAME ...]
        [--steps N] [--seed S] [--draws N] [--out DIR]

The volatility model of ``stochastic_volatility.py`` (same true globals), on ``K`` return
series of length ``T`` (default 2500) simulated from data seeds ``DATA_SEED``,
``DATA_SEED + 1``, ...: the first is the benchmark's own data. On each, every guide trains by
``af.fit``'s defaults and is scored against the simulated path (coverage of its 90% band,
RMSE of its mean path), and so is the reference sampler (NUTS on the non-centered model, as in
``stochastic_volatility.py``; its stored run on the benchmark's data).

One data set's coverage is a noisy measure of calibration. The path is persistent (0.95), so
its 2,500 states hold few independent checks, and even the exact posterior's band covers more
or less than 90% of one simulated path. Averaged over data sets drawn from the model, a
calibrated posterior's coverage is 90% (exactly for the path given the true globals; with the
globals inferred, to within their posterior's spread, small at this length). So the table
gives, per guide, the mean coverage over the data sets, and on each data set its distance from
NUTS's coverage and RMSE: what a guide misses beyond what the exact posterior misses there.
"""

from __future__ import annotations

import json
import math
import statistics
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import stochastic_volatility as sv
import torch
from _study import (
    PRIOR_STRUCTURED,
    chosen,
    guide_draws,
    parse_args,
    print_table,
    save_figure,
    seed_everything,
)

import pyro_arflow as af

DEFAULT_GUIDES = ("AutoNormal", PRIOR_STRUCTURED)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(
        __doc__.splitlines()[0],
        default_steps=15000,
        argv=argv,
        options={
            "--length": (sv.LONG_REFERENCE_LENGTH, "number of returns T"),
            "--datasets": (5, "number of simulated data sets K"),
            "--draws": (4000, "guide draws for the band and the mean path"),
            "--mcmc-draws": (
                0,
                "NUTS draws per chain after as many warm-up steps (0: the "
                "reference sampler's settings)",
            ),
        },
        lists={"--guides": f"fit only these guides (default: {', '.join(DEFAULT_GUIDES)})"},
    )
    guides = chosen(sv.guides_for(args.length), args.guides or list(DEFAULT_GUIDES))
    rows = []
    for data_seed in range(sv.DATA_SEED, sv.DATA_SEED + args.datasets):
        true_log_vol, returns = sv.simulate(args.length, data_seed)
        reference = reference_scores(returns, true_log_vol, data_seed, args)
        no_fit = {"steps": math.nan, "converged": math.nan}  # n/a in the table
        rows.append({"data seed": data_seed, "guide": sv.REFERENCE_ROW, **no_fit, **reference})
        for name, make_guide in guides.items():
            seed_everything(args.seed)
            guide = make_guide()
            fit = af.fit(sv.model, guide, returns, max_steps=args.steps, progress=False)
            row = {
                "data seed": data_seed,
                "guide": name,
                "steps": fit.steps,
                "converged": fit.status,
                "seconds": fit.seconds,
            }
            if not fit.diverged:
                log_vol = guide_draws(sv.model, guide, (returns,), args.draws, ["log_vol"])
                scores = sv.against_truth(log_vol["log_vol"], true_log_vol)
                row |= scores | {
                    "coverage - NUTS": scores["90% band coverage"] - reference["90% band coverage"],
                    "RMSE - NUTS": scores["path RMSE"] - reference["path RMSE"],
                }
            rows.append(row)
    name = f"quality_coverage_T{args.length}"
    title = (
        f"Stochastic volatility, T={args.length}, on {args.datasets} simulated data sets "
        f"(data seeds {sv.DATA_SEED}..{sv.DATA_SEED + args.datasets - 1}; inference seed "
        f"{args.seed}), each guide trained until flat (at most {args.steps} steps)"
    )
    print_table(title, summarize(rows), args.out, name)
    print_table(title + ", data set by data set", rows, args.out, f"{name}_by_data_set")
    plot(rows, args.out / f"{name}.png")
    return rows


def reference_scores(
    returns: torch.Tensor, true_log_vol: torch.Tensor, data_seed: int, args: Namespace
) -> dict[str, float]:
    """NUTS's coverage and RMSE against the simulated path: the stored reference's on the
    benchmark's own data, a fresh run of the reference sampler on any other."""
    stored = sv.REFERENCES.get(len(returns))
    own_data = data_seed == sv.DATA_SEED and not args.mcmc_draws
    if own_data and stored is not None and stored.exists():
        summary = json.loads(stored.read_text())
        if "against_truth" in summary:
            return {"seconds": summary["settings"]["seconds"], **summary["against_truth"]}
    run = sv.reference_nuts(returns, args.seed, args.mcmc_draws or None)
    log_vol = run.draws["log_vol"].flatten(0, 1)
    return {
        "seconds": run.seconds,
        **sv.against_truth(log_vol, true_log_vol),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per guide (and NUTS): how many fits converged, the mean and range of the coverage and
    of the RMSE over the data sets, the mean distance from NUTS's, the median seconds."""
    summary = []
    for name in dict.fromkeys(row["guide"] for row in rows):
        own = [row for row in rows if row["guide"] == name]
        scored = [row for row in own if "90% band coverage" in row]
        coverage = [row["90% band coverage"] for row in scored]
        rmse = [row["path RMSE"] for row in scored]
        entry = {
            "guide": name,
            "data sets": len(own),
            "mean coverage": statistics.fmean(coverage),
            "coverage range": f"[{min(coverage):.3f}, {max(coverage):.3f}]",
            "mean RMSE": statistics.fmean(rmse),
            "RMSE range": f"[{min(rmse):.3f}, {max(rmse):.3f}]",
            "median seconds": statistics.median(row["seconds"] for row in own),
        }
        if name != sv.REFERENCE_ROW:
            entry["converged"] = sum(row["converged"].startswith("converged") for row in own)
            entry["mean |coverage - NUTS|"] = statistics.fmean(
                abs(row["coverage - NUTS"]) for row in scored
            )
            entry["mean RMSE - NUTS"] = statistics.fmean(row["RMSE - NUTS"] for row in scored)
        summary.append(entry)
    return summary


def plot(rows: list[dict], path: Path) -> None:
    """Coverage and RMSE on each data set, one marker per guide, the nominal 90% dashed."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    seeds = list(dict.fromkeys(row["data seed"] for row in rows))
    names = list(dict.fromkeys(row["guide"] for row in rows))
    for offset, name in enumerate(names):
        scored = [row for row in rows if row["guide"] == name and "path RMSE" in row]
        where = [
            seeds.index(row["data seed"]) + 0.12 * (offset - (len(names) - 1) / 2) for row in scored
        ]
        for axis, column in zip(axes, ("90% band coverage", "path RMSE"), strict=True):
            axis.plot(where, [row[column] for row in scored], "o", label=name)
    axes[0].axhline(0.9, color="black", linestyle="--", linewidth=0.8)
    for axis, column in zip(axes, ("90% band coverage", "path RMSE"), strict=True):
        axis.set_xticks(range(len(seeds)), [str(seed) for seed in seeds], fontsize=7)
        axis.set_xlabel("data seed")
        axis.set_title(column, fontsize=9)
    axes[0].legend(fontsize=7)
    save_figure(figure, path)


if __name__ == "__main__":
    torch.set_num_threads(1)  # as in stochastic_volatility.py: small models, a core left free
    main()
