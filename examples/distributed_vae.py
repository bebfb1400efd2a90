"""A flow VAE trained data-parallel: DistributedDataParallel around Pyro's ELBO module.

    python examples/distributed_vae.py [--steps N] [--out DIR]     # 1, then 2 processes here
    torchrun --nproc_per_node=G examples/distributed_vae.py          # G processes (GPUs)

A digits VAE (conditional-IAF posterior, MAF ``FlowPrior``) whose ``Trace_ELBO()(model, guide)``
is one ``nn.Module``. Every rank calls ``af.init_parameters``, wraps it in DDP and scores its
shard of each batch under a plate of the data's size. Table: time per step and held-out ELBO
per image for 1 and 2 processes (under torchrun, rank 0's world); figure: training loss.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from sklearn.datasets import load_digits
from torch import nn

import pyro_arflow as af

LATENT, CONTEXT, TRAIN, BATCH = 8, 16, 1500, 128


class Model(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.ReLU(), nn.Linear(128, 64))
        self.prior = af.FlowPrior(LATENT, flow="maf", num_flows=2, hidden_dims=[64])

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        with pyro.plate("images", TRAIN, subsample=indices):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class Guide(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2 * LATENT + CONTEXT)
        )
        self.flow = af.build_flow("iaf", LATENT, 2, context_dim=CONTEXT, hidden_dims=[64])

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        loc, raw_scale, context = self.encoder(x).split([LATENT, LATENT, CONTEXT], -1)
        base = dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1)
        with pyro.plate("images", TRAIN, subsample=indices):
            pyro.sample("z", dist.TransformedDistribution(base, [self.flow.condition(context)]))


def train(steps: int, device: str = "cpu") -> tuple[str, list[float]]:
    """This rank's training (the process group is up): its table row and loss curve."""
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    pyro.settings.set(module_local_params=True)
    images = (torch.tensor(load_digits().data, dtype=torch.float32) > 8).float()
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    pyro.set_rng_seed(0)  # the same modules on every rank (DDP broadcasts rank 0's anyway)
    images, elbo = images.to(device), Trace_ELBO()(Model().to(device), Guide().to(device))
    shard = torch.arange(rank * BATCH // world, (rank + 1) * BATCH // world)
    af.init_parameters(elbo, images[shard], shard)
    ddp = nn.parallel.DistributedDataParallel(elbo)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)  # the same global batches on every rank
    curve, start = [], time.perf_counter()
    for _ in range(steps):
        batch = torch.randperm(TRAIN, generator=generator)[:BATCH].chunk(world)[rank]
        loss = ddp(images[batch], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item() / TRAIN)
    milliseconds = 1e3 * (time.perf_counter() - start) / steps
    with torch.no_grad():  # the ELBO per held-out image, 20 draws each
        held_out = torch.arange(TRAIN, len(images))
        test = -sum(elbo(images[held_out], held_out).item() for _ in range(20)) / (20 * TRAIN)
    return f"| {world} | {torch_dist.get_backend()} | {milliseconds:.1f} | {test:.2f} |", curve


def spawned(rank: int, world: int, scratch: str, steps: int) -> None:
    rendezvous = f"file://{scratch}/rendezvous{world}"
    torch_dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    result = train(steps)
    if rank == 0:
        torch.save(result, f"{scratch}/result{world}.pt")
    torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for table, plot")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:  # under torchrun, which sets the rank and world
        cuda = torch.cuda.is_available()
        torch_dist.init_process_group("nccl" if cuda else "gloo")
        results = [train(args.steps, f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")]
        results = results[: torch_dist.get_rank() == 0]  # rank 0 reports
        torch_dist.destroy_process_group()
    else:
        with tempfile.TemporaryDirectory() as scratch:
            for world in (1, 2):
                torch.multiprocessing.spawn(spawned, (world, scratch, args.steps), nprocs=world)
            results = [torch.load(f"{scratch}/result{world}.pt") for world in (1, 2)]
    table = "| processes | backend | ms per step | test ELBO per image |\n|---|---|---|---|"
    table = "\n".join([table] + [row for row, _ in results])
    print(table)
    (args.out / "distributed_vae.md").write_text(table + "\n")
    figure, axis = plt.subplots(figsize=(7, 4))
    for world, (_, curve) in enumerate(results, start=1):
        axis.plot([chunk.mean() for chunk in torch.tensor(curve).split(20)], label=f"{world}")
    axis.set(xlabel="steps / 20", ylabel="training loss per image", title="processes:")
    axis.legend()
    figure.savefig(args.out / "distributed_vae.png", dpi=110)


if __name__ == "__main__":
    main()
