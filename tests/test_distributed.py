"""Data-parallel training on torch.distributed: two gloo processes on this machine take the
steps a single process takes on the union of their shards, and rank 0's checkpoint loads in a
single process.

Every rank seeds Pyro the same before each step, so the guide's noise is the same everywhere;
the model's data plate is ``pyro.plate("data", N, subsample=shard)`` with the global size.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from torch import nn

import pyro_arflow as af

N, STEPS, WORLD = 40, 4, 2
SHARDS = [torch.arange(0, N, 2), torch.arange(1, N, 2)]  # what a DistributedSampler deals
UNION = torch.arange(N)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N, 4, generator=generator, device="cpu")
    return x, x @ torch.tensor([1.0, -0.5, 0.3, 0.0]) + 0.2 * torch.randn(N, generator=generator)


def regression(shard: torch.Tensor) -> None:
    """Global latents (weights and noise scale) and a subsampled data plate."""
    x, y = data()
    weights = pyro.sample("weights", dist.Normal(torch.zeros(4), 1.0).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", N, subsample=shard):
        pyro.sample("y", dist.Normal(x[shard] @ weights, scale), obs=y[shard])


class Decoder(PyroModule):
    """Local latents z_n ~ FlowPrior, x_n | z_n ~ N(decoder(z_n), 0.3^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.prior = af.FlowPrior(2, hidden_dims=[8])
        self.decoder = nn.Linear(2, 4)

    def forward(self, shard: torch.Tensor) -> None:
        x, _ = data()
        with pyro.plate("data", N, subsample=shard):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Normal(self.decoder(z), 0.3).to_event(1), obs=x[shard])


class Encoder(PyroModule):
    """The amortized guide: an encoder's Gaussian reshaped by a conditional IAF (or MAF)."""

    def __init__(self, layer=af.conditional_iaf) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 2 + 2 + 3)
        self.flow = layer(2, 3, hidden_dims=[8])

    def forward(self, shard: torch.Tensor) -> None:
        x, _ = data()
        with pyro.plate("data", N, subsample=shard):
            loc, raw_scale, context = self.encoder(x[shard]).split([2, 2, 3], dim=-1)
            base = dist.Normal(loc, F.softplus(raw_scale)).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [self.flow.condition(context)]))


def build(scenario: str) -> nn.Module:
    """The ELBO module of a scenario, initialized the same in every process."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    if scenario in af.available_flows():
        kwargs = {"hidden_size": 4} if scenario.endswith("lstm") else {"hidden_dims": [8]}
        elbo = Trace_ELBO()(regression, af.AutoARFlow(regression, flow=scenario, **kwargs))
    else:
        layer = af.conditional_maf if scenario == "amortized-maf" else af.conditional_iaf
        elbo = Trace_ELBO()(Decoder(), Encoder(layer))
    pyro.set_rng_seed(1)
    return af.init_parameters(elbo, SHARDS[0])


def trained_parameters(module: nn.Module, optimizer, loss_of_step) -> list[list[torch.Tensor]]:
    history = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_of_step(step).backward()
        optimizer.step()
        history.append([p.detach().clone() for p in module.parameters()])
    return history


def worker(rank: int, scenario: str, rendezvous: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD
    )
    pyro.settings.set(module_local_params=True)
    elbo = build(scenario)
    ddp = nn.parallel.DistributedDataParallel(elbo)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.05)

    def loss(step: int) -> torch.Tensor:
        pyro.set_rng_seed(100 + step)  # the same guide noise on every rank
        return ddp(SHARDS[rank])

    history = trained_parameters(elbo, optimizer, loss)
    torch.save(history, f"{out}/rank{rank}.pt")
    if rank == 0:
        torch.save(elbo.state_dict(), f"{out}/checkpoint.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture
def module_local_params():
    pyro.settings.set(module_local_params=True)
    yield
    pyro.settings.set(module_local_params=False)


@pytest.mark.parametrize(
    "scenario", ["iaf", "maf", "iaf-lstm", "maf-lstm", "amortized-iaf", "amortized-maf"]
)
def test_two_ranks_take_the_steps_of_one_process_on_the_union(
    scenario, tmp_path, module_local_params
):
    torch.multiprocessing.spawn(
        worker, args=(scenario, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = build(scenario)
    optimizer = torch.optim.Adam(single.parameters(), lr=0.05)

    def loss(step: int) -> torch.Tensor:
        if scenario in af.available_flows():  # global latents only: one draw serves the union
            pyro.set_rng_seed(100 + step)
            return single(UNION)
        losses = []  # local latents: each shard's noise as its rank drew it
        for shard in SHARDS:
            pyro.set_rng_seed(100 + step)
            losses.append(single(shard))
        return torch.stack(losses).mean()

    reference = trained_parameters(single, optimizer, loss)
    for step in range(STEPS):
        for first, second, expected in zip(*(r[step] for r in ranks), reference[step], strict=True):
            assert torch.equal(first, second)  # the ranks never drift apart
            torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
        moved = [not torch.equal(a, b) for a, b in zip(reference[step], reference[0], strict=True)]
    assert any(moved)  # training did move the parameters

    restored = build(scenario)  # rank 0's checkpoint, in one process
    restored.load_state_dict(torch.load(tmp_path / "checkpoint.pt"))
    for loaded, expected in zip(restored.parameters(), reference[-1], strict=True):
        torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


def test_pitfalls_are_errors(tmp_path):
    def model(shard):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="module_local_params=True"):
        af.init_parameters(Trace_ELBO()(model, af.AutoARFlow(model)), UNION)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        guide = af.AutoARFlow(model)
        with pytest.raises(ValueError, match="inside a distributed run.*init_parameters"):
            guide(UNION)  # as if DistributedDataParallel had wrapped it before its first call
    finally:
        torch.distributed.destroy_process_group()
