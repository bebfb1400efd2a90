"""Stochastic volatility: flow guides against mean-field and full-rank VI, scored against NUTS.

    python benchmarks/quality/stochastic_volatility.py [--length T] [--steps N] [--seed S]
        [--out DIR] [--guides NAME ...] [--no-mcmc] [--mcmc-draws N] [--draws N]
    python benchmarks/quality/stochastic_volatility.py --regenerate-reference  # NUTS (T=200)
    python benchmarks/quality/stochastic_volatility.py --length 2500           # a long path
    python benchmarks/quality/stochastic_volatility.py --length 2500 --regenerate-reference

The model (centered parametrization; Kim, Shephard and Chib 1998):

    persistence ~ Uniform(-1, 1),  mean ~ Normal(-1, 2),  shock ~ HalfNormal(0.5)
    h_1 ~ Normal(mean, shock / sqrt(1 - persistence^2))
    h_t ~ Normal(mean + persistence * (h_{t-1} - mean), shock)     t = 2..T
    r_t ~ Normal(0, exp(h_t / 2))

on T returns simulated from persistence 0.95, mean -1, shock 0.25 (a fixed seed, so the data
are the same on every run). Every guide trains until its ELBO is flat, then anneals (the
rule is ``af.fit``'s). At T = 200 each one is scored against a NUTS reference (2 chains
of 2000 draws at target acceptance 0.95 on the non-centered form of the model, which has the
same posterior; its summary ships in ``data/sv_nuts_reference.json``): the mean error of the
posterior means and the mean |log ratio| of the posterior sds, in NUTS sds, over all 203
latents and over the three globals.
Two more rows run NUTS itself on the centered model, plain and preconditioned by the trained
masked IAF guide (NeuTra, Hoffman et al. 2019), with their effective sample sizes per second.
At T = 2500 the reference is 2 chains of 1000 draws after 500 warm-up steps at target
acceptance 0.9 (``data/sv_nuts_reference_T2500.json``). At any length the guides are also
scored against the simulated path (coverage of the 90% band, RMSE of the posterior mean), as
NUTS's own draws are (in the reference file, and the table's last row at T = 2500). Longer
series use the guides that fit there: full-rank Gaussians and Pyro's IAF (whose hidden
layers grow with T) do not.
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
    PRIOR_STRUCTURED,
    Chains,
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
from pyro import poutine
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.reparam import NeuTraReparam

import pyro_arflow as af
from pyro_arflow.recurrences import linear_recurrence

TRUE_PERSISTENCE, TRUE_MEAN, TRUE_SHOCK, DATA_SEED = 0.95, -1.0, 0.25, 20261125
REFERENCE_LENGTH = 200
REFERENCE = Path(__file__).parent / "data" / "sv_nuts_reference.json"
LONG_REFERENCE_LENGTH = 2500
REFERENCES = {
    REFERENCE_LENGTH: REFERENCE,
    LONG_REFERENCE_LENGTH: Path(__file__).parent / "data" / "sv_nuts_reference_T2500.json",
}
"""The lengths with a NUTS reference: T=200 (2 chains x 2000 draws at target acceptance
0.95) and T=2500 (2 chains x 1000 draws after 500 warm-up steps, at 0.9)."""
GLOBALS = ("persistence", "mean", "shock")
REFERENCE_ROW = "NUTS (the reference)"


def model(returns: torch.Tensor) -> None:
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    mean = pyro.sample("mean", dist.Normal(-1.0, 2.0))
    shock = pyro.sample("shock", dist.HalfNormal(0.5))
    log_vol = pyro.sample("log_vol", ar1_path(mean, persistence, shock, len(returns)))
    pyro.sample("returns", dist.Normal(0.0, torch.exp(log_vol / 2)).to_event(1), obs=returns)


def ar1_path(mean, persistence, shock, length: int) -> af.GaussianPath:
    """The stationary AR(1) prior of the log-volatility path."""
    return af.GaussianPath(
        lambda h, t: (mean + persistence * (h - mean), shock),
        dist.Normal(mean, shock / torch.sqrt(1 - persistence**2)),
        length,
    )


def non_centered_model(returns: torch.Tensor) -> None:
    """The same joint distribution, the path written through its standardized innovations:
    the same posterior, in a geometry NUTS explores far faster (the reference sampler)."""
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    mean = pyro.sample("mean", dist.Normal(-1.0, 2.0))
    shock = pyro.sample("shock", dist.HalfNormal(0.5))
    innovations = pyro.sample(
        "innovations", dist.Normal(torch.zeros(len(returns)), 1.0).to_event(1)
    )
    log_vol = path_from_innovations(mean, persistence, shock, innovations)
    pyro.sample("returns", dist.Normal(0.0, torch.exp(log_vol / 2)).to_event(1), obs=returns)


def path_from_innovations(mean, persistence, shock, innovations) -> torch.Tensor:
    """The stationary AR(1) path whose standardized innovations are ``innovations``:

        h_1 - mean = s_1 e_1,  h_t - mean = persistence (h_{t-1} - mean) + s_t e_t,
        s_1 = shock / sqrt(1 - persistence^2), s_t = shock (t > 1),

    a linear recurrence solved by the package's scan in log2(T) rounds (no loop over t, which
    NUTS differentiates many times, and no T x T matrix, which a long path cannot afford).
    """
    mean, persistence, shock = (p.unsqueeze(-1) for p in (mean, persistence, shock))
    first = shock / torch.sqrt(1 - persistence**2) * innovations[..., :1]
    shocks = torch.cat((first, shock * innovations[..., 1:]), dim=-1).movedim(-1, 0)
    coefficients = persistence.expand(innovations[..., 1:].shape).movedim(-1, 0)
    return mean + linear_recurrence(coefficients, shocks).movedim(0, -1)


def simulate(length: int, data_seed: int = DATA_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The true log-volatility path and ``length`` returns, from ``data_seed`` (the
    benchmark's data by default)."""
    with torch.random.fork_rng():
        torch.manual_seed(data_seed)
        truth = ar1_path(
            torch.tensor(TRUE_MEAN), torch.tensor(TRUE_PERSISTENCE), TRUE_SHOCK, length
        )
        log_vol = truth.sample()
        returns = torch.exp(log_vol / 2) * torch.randn(length)
    return log_vol, returns


def guides_for(length: int) -> dict:
    if length <= 500:
        return comparison_guides(model)
    return {
        "AutoNormal": lambda: AutoNormal(model, init_loc_fn=init_to_median),
        "AutoLowRankMVN (rank 10)": lambda: AutoLowRankMultivariateNormal(
            model, init_loc_fn=init_to_median, rank=10
        ),
        "AutoARFlow('iaf-lstm', flat)": lambda: af.AutoARFlow(
            model, flow="iaf-lstm", hidden_size=32, init_loc_fn=init_to_median, paths="flat"
        ),
        PRIOR_STRUCTURED: lambda: af.AutoARFlow(model, init_loc_fn=init_to_median),
    }


GUIDES = guides_for(REFERENCE_LENGTH)


def regenerate_reference(length: int, seed: int) -> None:
    if length not in REFERENCES:
        raise SystemExit(f"references are kept for T in {sorted(REFERENCES)}, not {length}")
    true_log_vol, returns = simulate(length)
    run = reference_nuts(returns, seed)
    write_reference(REFERENCES[length], run)
    # NUTS's own scores against the simulated path: what the exact posterior gives there
    draws = run.draws["log_vol"].flatten(0, 1)
    summary = json.loads(REFERENCES[length].read_text())
    summary["against_truth"] = against_truth(draws, true_log_vol)
    REFERENCES[length].write_text(json.dumps(summary, indent=1))


def reference_nuts(returns: torch.Tensor, seed: int, draws: int | None = None) -> Chains:
    """The reference sampler: 2 NUTS chains on the non-centered model (T = 200: 2000 draws
    after 1000 warm-up steps at target acceptance 0.95; longer series: 1000 after 500 at 0.9),
    the path recovered from the innovations. ``draws``: that many per chain after as many
    warm-up steps instead (short runs that check a script)."""
    warmup, kept, target = (
        (1000, 2000, 0.95) if len(returns) == REFERENCE_LENGTH else (500, 1000, 0.9)
    )
    if draws is not None:
        warmup, kept = draws, draws
    run = run_nuts(non_centered_model, (returns,), 2, warmup, kept, seed, target_accept=target)
    innovations = run.draws.pop("innovations")
    run.draws["log_vol"] = path_from_innovations(
        run.draws["mean"], run.draws["persistence"], run.draws["shock"], innovations
    )
    return run


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_study_args(
        __doc__.splitlines()[0],
        default_steps=15000,
        argv=argv,
        flags={"--no-mcmc": "skip the plain and NeuTra NUTS rows"},
        options={
            "--length": (REFERENCE_LENGTH, "number of returns T"),
            "--mcmc-draws": (300, "NUTS draws per chain (after as many warm-up steps)"),
        },
    )
    if args.regenerate_reference:
        regenerate_reference(args.length, args.seed)
        return []
    true_log_vol, returns = simulate(args.length)
    known = REFERENCES.get(args.length)
    reference = json.loads(known.read_text()) if known and known.exists() else None
    rows, bands, fits, guides = [], {}, {}, {}
    for name, make_guide in chosen(guides_for(args.length), args.guides).items():
        seed_everything(args.seed)
        guide = guides[name] = make_guide()
        fit = fits[name] = af.fit(model, guide, returns, max_steps=args.steps, progress=False)
        if fit.diverged:  # nothing to score: the row says so
            rows.append({"guide": name, **fit_columns(fit, model, guide, (returns,), args.draws)})
            continue
        draws = guide_draws(model, guide, (returns,), args.draws, ["log_vol", *GLOBALS])
        bands[name] = path_band(draws["log_vol"])
        rows.append(
            {
                "guide": name,
                **fit_columns(fit, model, guide, (returns,), args.draws),
                **scores(draws, reference, true_log_vol, bands[name]),
                **(
                    resampled_columns(model, guide, (returns,), args.draws, reference, GLOBALS)
                    if reference is not None
                    else {}
                ),
            }
        )
    if reference is not None and "against_truth" in reference:
        rows.append({"guide": REFERENCE_ROW, **reference["against_truth"]})
    # the reference length's results, and each other length's under its own name
    suffix = "" if args.length == REFERENCE_LENGTH else f"_T{args.length}"
    name = "quality_stochastic_volatility" + suffix
    print_table(
        f"Stochastic volatility, T={args.length}, guides trained until flat (at most "
        f"{args.steps} steps, seed {args.seed})",
        rows,
        args.out,
        name,
    )
    # bands holds the guides that did not diverge: NeuTra needs a trained one
    if not (suffix or args.no_mcmc) and "AutoARFlow('iaf', flat)" in bands:
        samplers = compare_samplers(
            guides["AutoARFlow('iaf', flat)"], returns, reference, true_log_vol, args
        )
        print_table(
            f"NUTS on the centered model, 2 chains x {args.mcmc_draws} draws after as many "
            "warm-up steps: plain, and preconditioned by the trained masked IAF guide",
            samplers,
            args.out,
            "quality_stochastic_volatility_nuts",
        )
        rows += samplers
    plot(true_log_vol, returns, bands, fits, args.out / f"{name}.png")
    return rows


def path_band(log_vol: torch.Tensor) -> torch.Tensor:
    """The 5%, 50% and 95% quantiles of each state, from draws shaped ``(draws, T)``."""
    return torch.quantile(log_vol, torch.tensor([0.05, 0.5, 0.95]), dim=0)


def against_truth(
    log_vol: torch.Tensor, true_log_vol: torch.Tensor, band: torch.Tensor | None = None
) -> dict[str, float]:
    """The share of the simulated path inside the 90% ``band`` (by default the draws' own,
    :func:`path_band`) and the RMSE of the draws' mean path (``log_vol`` shaped
    ``(draws, T)``) against it."""
    low, _, high = path_band(log_vol) if band is None else band
    return {
        "90% band coverage": ((true_log_vol >= low) & (true_log_vol <= high)).float().mean().item(),
        "path RMSE": math.sqrt(((log_vol.mean(0) - true_log_vol) ** 2).mean().item()),
    }


def scores(draws, reference, true_log_vol, band=None) -> dict[str, float]:
    """Against NUTS (when there is a reference) and against the simulated path (in ``band``,
    by default the draws' own)."""
    truth_scores = against_truth(draws["log_vol"], true_log_vol, band)
    if reference is None:
        return truth_scores
    error, log_sd = posterior_error(draws, reference, ["log_vol", *GLOBALS])
    globals_error, globals_log_sd = posterior_error(draws, reference, GLOBALS)
    return {
        "mean err (sd)": error,
        "log-sd err": log_sd,
        "globals mean err (sd)": globals_error,
        "globals log-sd err": globals_log_sd,
        **truth_scores,
    }


def compare_samplers(guide, returns, reference, true_log_vol, args) -> list[dict]:
    """Plain NUTS and NeuTra-NUTS on the centered model: ESS per second, divergences, R-hat."""
    guide.requires_grad_(False)  # NUTS needs gradients in the latent only
    neutra = NeuTraReparam(guide)
    # Each at the target acceptance that suits it (README): plain NUTS at 0.9 had no
    # divergences and at 0.95 ran 3x slower per effective draw; NeuTra at 0.9 diverged 4
    # times in 1000 draws (an older guide 258 times at Pyro's default 0.8), at 0.95 not once.
    samplers = {
        "NUTS (centered)": (model, lambda draws: draws, 0.9),
        "NeuTra-NUTS (iaf guide)": (
            poutine.reparam(model, config=lambda _: neutra),
            lambda draws: neutra.transform_sample(next(iter(draws.values()))),
            0.95,
        ),
    }
    rows = []
    for name, (sampled_model, to_sites, target_accept) in samplers.items():
        run = run_nuts(
            sampled_model,
            (returns,),
            2,
            args.mcmc_draws,
            args.mcmc_draws,
            args.seed,
            target_accept,
        )
        with torch.no_grad():
            sites = to_sites({k: v.flatten(0, 1) for k, v in run.draws.items()})
        per_chain = {s: sites[s].unflatten(0, (2, -1)) for s in ("log_vol", *GLOBALS)}
        summary = Chains(per_chain, run.seconds, run.divergences, run.settings).summary()
        draws = {s: v.flatten(0, 1) for s, v in per_chain.items()}
        rows.append(
            {
                "guide": name,
                "target acceptance": target_accept,
                "seconds": run.seconds,
                "min ESS / s": min(s["min_ess"] for s in summary.values()) / run.seconds,
                "divergences": run.divergences,
                "max R-hat": max(s["max_rhat"] for s in summary.values()),
                **scores(draws, reference, true_log_vol),
            }
        )
    return rows


def plot(true_log_vol, returns, bands, fits, path) -> None:
    time = torch.arange(len(returns)).numpy()

    def volatility(log_vol: torch.Tensor):
        return torch.exp(log_vol / 2).numpy()

    figure, axes = plt.subplots(len(bands) + 2, 1, figsize=(10, 2.2 * (len(bands) + 2)))
    plot_elbo_traces(axes[0], fits)
    axes[1].plot(time, returns.numpy(), color="0.4", linewidth=0.8)
    axes[1].set_ylabel("return")
    axes[1].set_title("Simulated returns and each guide's 90% volatility band against the truth")
    for axis, (name, (low, median, high)) in zip(axes[2:], bands.items(), strict=True):
        axis.fill_between(time, volatility(low), volatility(high), alpha=0.35, label="90% band")
        axis.plot(time, volatility(median), linewidth=1.0, label="median")
        axis.plot(time, volatility(true_log_vol), color="black", linewidth=1.0, label="truth")
        axis.set_ylabel("volatility")
        axis.set_title(name, fontsize=9, loc="left")
    axes[2].legend(loc="upper right", fontsize=8, ncol=3)
    axes[-1].set_xlabel("t")
    save_figure(figure, path)


if __name__ == "__main__":
    # These models are small: one torch thread steps them faster than two (the 2500-step
    # LSTM guide: 27 steps per second against 13), and leaves a core to the next job.
    torch.set_num_threads(1)
    main()
