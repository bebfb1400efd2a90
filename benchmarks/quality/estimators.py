"""Gradient estimators and objectives for the prior-structured guide, scored against NUTS.

    python benchmarks/quality/estimators.py [--steps N] [--seed S] [--out DIR] [--draws N]
        [--models volatility nile] [--estimators NAME ...]

The default ``af.AutoARFlow`` on the stochastic-volatility model (T=200) and the Nile's local
level, the data and NUTS references of ``stochastic_volatility.py`` and ``local_level.py``,
trained by ``af.fit`` with each of:

* ``KL, then Renyi alpha=0.5``: ``fit``'s default, the reparameterized KL gradient to the
  first plateau and the Rényi bound of order 1/2 from there (``mass_covering``);
* ``Trace_ELBO``: the KL throughout (``mass_covering="never"``);
* ``sticking the landing``: the same objective, the globals' score term dropped (Roeder et
  al. 2017; ``fit(sticking_the_landing="always")``), and the same from the second plateau on
  (``"after the first plateau"``), near the optimum;
* ``Renyi alpha=0.5``: Pyro's ``RenyiELBO`` (Li and Turner 2016) throughout, a mass-covering
  bound between KL (alpha -> 1) and the importance-weighted bound (alpha = 0);
* ``IW bound``: the importance-weighted bound (Burda et al. 2016; ``RenyiELBO`` at alpha 0).

Every row draws ``PARTICLES`` particles per step (what ``fit``'s ``num_particles="auto"``
picks for both models on the project's CPU machine), so that the objectives differ and the
gradients' noise does not.

Each row: steps, seconds, errors against NUTS over all latents and over the globals, the
median PSIS k-hat, and the globals after importance resampling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import local_level
import stochastic_volatility
import torch
from _study import (
    fit_columns,
    guide_draws,
    parse_args,
    posterior_error,
    print_table,
    resampled_columns,
    seed_everything,
)
from pyro.infer import RenyiELBO

import pyro_arflow as af

PARTICLES = 32

ESTIMATORS: dict[str, tuple[Callable[[], object | None], str, str]] = {
    "KL, then Renyi alpha=0.5 (fit's default)": (lambda: None, "never", "after the first plateau"),
    "Trace_ELBO": (lambda: None, "never", "never"),
    "sticking the landing": (lambda: None, "always", "never"),
    "sticking the landing after the first plateau": (
        lambda: None,
        "after the first plateau",
        "never",
    ),
    "Renyi alpha=0.5": (
        lambda: RenyiELBO(alpha=0.5, num_particles=PARTICLES, vectorize_particles=True),
        "never",
        "never",
    ),
    "IW bound": (
        lambda: RenyiELBO(alpha=0.0, num_particles=PARTICLES, vectorize_particles=True),
        "never",
        "never",
    ),
}
"""name -> (the loss ``fit`` gets, ``None`` for its own; its ``sticking_the_landing``; its
``mass_covering``)."""


def models() -> dict[str, dict]:
    _, returns = stochastic_volatility.simulate(stochastic_volatility.REFERENCE_LENGTH)
    return {
        "volatility": {
            "model": stochastic_volatility.model,
            "data": (returns,),
            "reference": stochastic_volatility.REFERENCE,
            "sites": ["log_vol", *stochastic_volatility.GLOBALS],
            "globals": stochastic_volatility.GLOBALS,
            "init": None,
        },
        "nile": {
            "model": local_level.model,
            "data": (local_level.FLOW,),
            "reference": local_level.REFERENCE,
            "sites": ["level", *local_level.GLOBALS],
            "globals": local_level.GLOBALS,
            "init": local_level.init_level_at_flow,
        },
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(
        __doc__.splitlines()[0],
        default_steps=30000,
        argv=argv,
        options={"--draws": (4000, "guide draws for the scores and each k-hat")},
        lists={"--models": "only these models", "--estimators": "only these estimators"},
    )
    rows = []
    for model_name, case in models().items():
        if args.models and model_name not in args.models:
            continue
        reference = json.loads(case["reference"].read_text())
        for name, (make_loss, landing, mass_covering) in ESTIMATORS.items():
            if args.estimators and name not in args.estimators:
                continue
            seed_everything(args.seed)
            init = {"init_loc_fn": case["init"]} if case["init"] else {}
            guide = af.AutoARFlow(case["model"], **init)
            fit = af.fit(
                case["model"],
                guide,
                *case["data"],
                max_steps=args.steps,
                num_particles=PARTICLES,
                loss=make_loss(),
                sticking_the_landing=landing,
                mass_covering=mass_covering,
                progress=False,
            )
            row = {"model": model_name, "estimator": name}
            row.update(fit_columns(fit, case["model"], guide, case["data"], args.draws))
            if not fit.diverged:
                draws = guide_draws(case["model"], guide, case["data"], args.draws, case["sites"])
                error, log_sd = posterior_error(draws, reference, case["sites"])
                globals_error, globals_log_sd = posterior_error(draws, reference, case["globals"])
                row.update(
                    {
                        "mean err (sd)": error,
                        "log-sd err": log_sd,
                        "globals mean err (sd)": globals_error,
                        "globals log-sd err": globals_log_sd,
                        **resampled_columns(
                            case["model"],
                            guide,
                            case["data"],
                            args.draws,
                            reference,
                            case["globals"],
                        ),
                    }
                )
            rows.append(row)
            print(row, flush=True)
    print_table(
        f"Estimators and objectives for the default AutoARFlow, trained by af.fit (at most "
        f"{args.steps} steps, seed {args.seed}); errors against NUTS",
        rows,
        args.out,
        "quality_estimators",
    )
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
