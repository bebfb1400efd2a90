"""What the examples share: command line, fits with a progress bar, ELBO estimates, tables."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

import pyro_arflow as af


def parse_args(
    description: str,
    default_steps: int,
    argv: Sequence[str] | None,
    flags: dict[str, str] | None = None,
) -> argparse.Namespace:
    """``--steps``, ``--seed``, ``--out``, and any boolean ``flags`` (name -> help)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=default_steps, help="SVI steps per fit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inference")
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for the plot and table"
    )
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    return parser.parse_args(argv)


def fit(
    model: Callable,
    guide: Callable,
    data: tuple,
    steps: int,
    label: str,
    lr: float = 0.01,
    particles: int = 4,
) -> float:
    """Train with Adam (learning rate decaying 10x over the run); returns the seconds taken."""
    optimizer = ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / max(steps, 1)), "clip_norm": 10.0})
    svi = SVI(
        model, guide, optimizer, Trace_ELBO(num_particles=particles, vectorize_particles=True)
    )
    start = time.perf_counter()
    with tqdm(range(steps), desc=f"{label:>28s}", leave=False) as bar:
        for step in bar:
            loss = svi.step(*data)
            if step % 50 == 0:
                bar.set_postfix(elbo=f"{-loss:.1f}")
    return time.perf_counter() - start


@torch.no_grad()
def elbo_estimate(model: Callable, guide: Callable, data: tuple, particles: int = 1000) -> float:
    """The ELBO by ``particles`` vectorized draws (standard error well under 0.1 nats here)."""
    return -Trace_ELBO(num_particles=particles, vectorize_particles=True).loss(model, guide, *data)


def print_table(title: str, rows: list[dict[str, Any]], out: Path, name: str) -> str:
    """Print ``rows`` as an aligned markdown table and save it beside the plot."""
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(map(str.ljust, r, widths)) + " |" for r in cells),
    ]
    text = f"{title}\n\n" + "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def comparison_guides(
    model: Callable, init_loc_fn: Callable = init_to_median
) -> dict[str, Callable[[], Any]]:
    """The guides the latent time-series examples compare: mean field, full-rank Gaussian,
    Pyro's IAF guide, and ours with a masked and with an LSTM conditioner (same widths).

    All start from ``init_loc_fn`` but Pyro's ``AutoIAFNormal``, which ignores it (it starts
    at N(0, I) in the unconstrained space).
    """
    return {
        "AutoNormal": lambda: AutoNormal(model, init_loc_fn=init_loc_fn),
        "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model, init_loc_fn=init_loc_fn),
        "Pyro AutoIAFNormal": lambda: AutoIAFNormal(model, hidden_dim=[256], num_transforms=2),
        "AutoARFlow('iaf')": lambda: af.AutoARFlow(
            model, flow="iaf", num_flows=2, hidden_dims=[256], init_loc_fn=init_loc_fn
        ),
        "AutoARFlow('iaf-lstm')": lambda: af.AutoARFlow(
            model, flow="iaf-lstm", num_flows=2, hidden_size=32, init_loc_fn=init_loc_fn
        ),
    }


def save_figure(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()


class AR1Path(dist.TorchDistribution):
    """A Gaussian AR(1) path h_1..h_T as one distribution (event shape (T,)):

        h_1 ~ Normal(loc, initial_scale),  h_t ~ Normal(loc + coefficient (h_{t-1} - loc), scale).

    coefficient in (-1, 1) with initial_scale = scale / sqrt(1 - coefficient^2) is the
    stationary AR(1); coefficient = 1 with initial_scale = scale is a random walk from loc.
    """

    arg_constraints = {
        "loc": constraints.real,
        "coefficient": constraints.real,
        "scale": constraints.positive,
        "initial_scale": constraints.positive,
    }
    support = constraints.real_vector

    def __init__(
        self, loc, coefficient, scale, initial_scale, length: int, validate_args=None
    ) -> None:
        params = torch.broadcast_tensors(
            *(
                torch.as_tensor(p, dtype=torch.get_default_dtype())
                for p in (loc, coefficient, scale, initial_scale)
            )
        )
        self.loc, self.coefficient, self.scale, self.initial_scale = params
        self.length = length
        super().__init__(self.loc.shape, torch.Size([length]), validate_args)

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        loc, coefficient, scale, initial_scale = (
            p.unsqueeze(-1) for p in (self.loc, self.coefficient, self.scale, self.initial_scale)
        )
        previous = torch.cat([loc.expand(h.shape[:-1] + (1,)), h[..., :-1]], dim=-1)
        first = torch.arange(self.length, device=h.device) == 0
        conditional = dist.Normal(
            loc + coefficient * (previous - loc), torch.where(first, initial_scale, scale)
        )
        return conditional.log_prob(h).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape)
        h = torch.empty(shape)
        h[..., 0] = self.loc + self.initial_scale * noise[..., 0]
        for t in range(1, self.length):
            h[..., t] = (
                self.loc
                + self.coefficient * (h[..., t - 1] - self.loc)
                + self.scale * noise[..., t]
            )
        return h

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AR1Path, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.coefficient, new.scale, new.initial_scale = (
            p.expand(batch_shape)
            for p in (self.loc, self.coefficient, self.scale, self.initial_scale)
        )
        new.length = self.length
        super(AR1Path, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new
