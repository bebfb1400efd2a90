"""The Nile's local level: a random-walk path under noise, with importance resampling.

    python examples/local_level.py [--seconds S] [--steps N] [--out DIR]

The annual flow of the Nile, 1871-1970 (Durbin and Koopman 2012), as a level that walks with
unknown step scale and is observed with unknown noise; the level is declared as an
``af.GaussianPath``. Pyro's ``AutoNormal`` and ``af.AutoARFlow`` train by ``af.fit`` under
the same time budget. The table gives each guide's ELBO, its PSIS k-hat (below 0.7 its draws
can be importance-weighted into the posterior), and the two scales' posterior mean and sd from
the guide and after ``af.importance_resample``; the figure shows the level's 90% bands. The
study scored against NUTS is ``benchmarks/quality/local_level.py``.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_median

import pyro_arflow as af

# Annual flow at Aswan, 10^8 m^3 (Cobb 1978), in hundreds; public domain (R's datasets::Nile).
# fmt: off
NILE = torch.tensor([
    1120, 1160, 963, 1210, 1160, 1160, 813, 1230, 1370, 1140, 995, 935, 1110, 994, 1020, 960,
    1180, 799, 958, 1140, 1100, 1210, 1150, 1250, 1260, 1220, 1030, 1100, 774, 840, 874, 694,
    940, 833, 701, 916, 692, 1020, 1050, 969, 831, 726, 456, 824, 702, 1120, 1100, 832, 764,
    821, 768, 845, 864, 862, 698, 845, 744, 796, 1040, 759, 781, 865, 845, 944, 984, 897, 822,
    1010, 771, 676, 649, 846, 812, 742, 801, 1040, 860, 874, 848, 890, 744, 749, 838, 1050, 918,
    986, 797, 923, 975, 815, 1020, 906, 901, 1170, 912, 746, 919, 718, 714, 740,
]) / 100.0
# fmt: on
SCALES = ("level_scale", "noise_scale")


def model(flow: torch.Tensor) -> None:
    start = pyro.sample("start", dist.Normal(10.0, 5.0))
    level_scale = pyro.sample("level_scale", dist.HalfNormal(2.0))
    noise_scale = pyro.sample("noise_scale", dist.HalfNormal(4.0))
    walk = af.GaussianPath(
        lambda x, t: (x, level_scale), dist.Normal(start, level_scale), len(flow)
    )
    level = pyro.sample("level", walk)
    pyro.sample("flow", dist.Normal(level, noise_scale.unsqueeze(-1)).to_event(1), obs=flow)


def start_level_at_data(site: dict) -> torch.Tensor:
    """The level starts at the observations (Pyro has no median for a path), the rest at
    their prior medians; a fresh copy each time, since AutoNormal trains it in place."""
    return NILE.clone() if site["name"] == "level" else init_to_median(site)


def summary(draws: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{draws[s].mean():.2f} ± {draws[s].std():.2f}" for s in SCALES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="training budget per guide")
    parser.add_argument("--steps", type=int, default=30000, help="most steps per guide")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for table, plot")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, bands = [], {}
    for name, guide_class in {"AutoNormal": AutoNormal, "AutoARFlow": af.AutoARFlow}.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = guide_class(model, init_loc_fn=start_level_at_data)
        result = af.fit(model, guide, NILE, max_steps=args.steps, max_seconds=args.seconds)
        with torch.no_grad():
            elbo = -Trace_ELBO(num_particles=200, vectorize_particles=True).loss(model, guide, NILE)
            guide_draws = Predictive(model, guide=guide, num_samples=4000, parallel=True)(NILE)
        resampled = af.importance_resample(model, guide, NILE, num_samples=1000)
        level = resampled.samples["level"].reshape(-1, len(NILE))
        bands[name] = level.quantile(torch.tensor([0.05, 0.5, 0.95]), dim=0)
        rows.append(
            {
                "guide": name,
                "status": result.status,
                "steps": result.steps,
                "ELBO": f"{elbo:.1f}",
                "k-hat": f"{resampled.khat:.2f}",
                "ESS": f"{resampled.ess:.0f}",
                "scales (guide)": summary(guide_draws),
                "scales (resampled)": summary(resampled.samples),
            }
        )
    table = "\n".join(
        ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        + ["| " + " | ".join(map(str, row.values())) + " |" for row in rows]
    )
    print(f"level_scale, noise_scale: posterior mean ± sd\n{table}")
    (args.out / "local_level.md").write_text(table + "\n")
    plot(bands, args.out / "local_level.png")


def plot(bands: dict[str, torch.Tensor], path: Path) -> None:
    years = torch.arange(1871, 1971)
    figure, axis = plt.subplots(figsize=(9, 3.6))
    axis.plot(years, NILE, "k.", ms=3, label="flow")
    for name, (low, median, high) in bands.items():
        axis.fill_between(years, low, high, alpha=0.25, label=f"{name}: 90% band (resampled)")
        axis.plot(years, median, lw=1)
    axis.set_ylabel("flow, 10^10 m^3")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
