"""The prior-structured guides over seeds: how far k-hat and the errors move between fits.

    python benchmarks/quality/seeds.py [--seeds N] [--out DIR] [--draws N] [--steps N]

The default ``AutoARFlow``, trained by ``af.fit``, on the three latent-path benchmarks (the
volatility model at T = 200, the Nile local level, the Lorenz-63 bridge), once per seed
0 .. N-1 (the data stay the same; the seed is the inference's), with ``fit``'s defaults (the KL,
then the Rényi bound of order 1/2 from the first plateau on) and with the KL throughout
(``mass_covering="never"``); and, on the two models with globals, ``paths="laplace"`` (each
draw's own Laplace approximation of the path) with ``fit``'s defaults. Each row is one fit
scored against the model's NUTS reference; each model and variant ends with the medians and
the ranges over the seeds: a single run's k-hat or globals' log-sd error is one draw from
this spread.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence

import local_level
import lorenz_bridge
import stochastic_volatility
import torch
from _study import (
    fit_columns,
    guide_draws,
    parse_args,
    posterior_error,
    print_table,
    seed_everything,
)

import pyro_arflow as af

MODELS = {
    "volatility (T=200)": (
        stochastic_volatility.model,
        (stochastic_volatility.simulate(stochastic_volatility.REFERENCE_LENGTH)[1],),
        stochastic_volatility.REFERENCE,
        "log_vol",
        stochastic_volatility.GLOBALS,
    ),
    "Nile local level": (
        local_level.model,
        (local_level.FLOW,),
        local_level.REFERENCE,
        "level",
        local_level.GLOBALS,
    ),
    "Lorenz bridge": (
        lorenz_bridge.model,
        (lorenz_bridge.simulate()[1],),
        lorenz_bridge.REFERENCE,
        "path",
        (),
    ),
}
"""name: (model, its arguments, its NUTS reference, its path site, its globals)."""
VARIANTS = {
    "prior, KL then Renyi 1/2 (defaults)": ("prior", "after the first plateau"),
    "prior, KL": ("prior", "never"),
    "laplace, KL then Renyi 1/2": ("laplace", "after the first plateau"),
}
"""name: ``AutoARFlow``'s ``paths`` and ``fit``'s ``mass_covering``."""
SUMMARIZED = (
    "PSIS k-hat (median of 5)",
    "path mean err (sd)",
    "path log-sd err",
    "globals mean err (sd)",
    "globals log-sd err",
)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(
        __doc__.splitlines()[0],
        default_steps=30000,
        argv=argv,
        options={
            "--seeds": (5, "fits per model, seeds 0 .. N-1"),
            "--draws": (4000, "guide draws for the scores and each k-hat"),
        },
    )
    rows = []
    for (name, case), (variant, (paths, mass_covering)) in itertools.product(
        MODELS.items(), VARIANTS.items()
    ):
        model, data, reference_file, path, globals_ = case
        if paths == "laplace" and not globals_:
            continue  # without globals, each draw's Laplace is the warm start's
        reference = json.loads(reference_file.read_text())
        fits = []
        for seed in range(args.seeds):
            seed_everything(seed)
            guide = af.AutoARFlow(model, paths=paths)
            fit = af.fit(
                model,
                guide,
                *data,
                max_steps=args.steps,
                mass_covering=mass_covering,
                progress=False,
            )
            columns = fit_columns(fit, model, guide, data, args.draws)
            row = {"model": name, "paths, objective": variant, "seed": str(seed), **columns}
            if not fit.diverged:
                draws = guide_draws(model, guide, data, args.draws, [path, *globals_])
                error, log_sd = posterior_error(draws, reference, [path])
                row.update({"path mean err (sd)": error, "path log-sd err": log_sd})
                if globals_:
                    error, log_sd = posterior_error(draws, reference, globals_)
                    row.update({"globals mean err (sd)": error, "globals log-sd err": log_sd})
            fits.append(row)
            print(row, flush=True)
        rows += fits
        rows.append(spread(name, variant, fits))
    print_table(
        f"The prior-structured AutoARFlow over {args.seeds} seeds, trained by af.fit: its "
        "defaults, the KL throughout, and each draw's Laplace (paths='laplace'); errors "
        "against NUTS",
        rows,
        args.out,
        "quality_seeds",
    )
    return rows


def spread(name: str, variant: str, fits: list[dict]) -> dict:
    """The medians and ranges of the scores over ``fits`` (those that did not diverge)."""
    row: dict = {"model": name, "paths, objective": variant, "seed": "median [min, max]"}
    for column in SUMMARIZED:
        values = [fit[column] for fit in fits if column in fit]
        if values:
            row[column] = f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"
    return row


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
