"""The flow VAE trained data-parallel: DistributedDataParallel around Pyro's ELBO module.

    torchrun --standalone --nproc_per_node=2 examples/distributed_vae.py [--steps N] [--out DIR]
    python examples/distributed_vae.py --compare [--steps N] [--seed S] [--out DIR]

The VAE of ``vae_ar_prior.py`` with a conditional-IAF posterior and a MAF ``FlowPrior``, split
into a model module and a guide module, so that ``Trace_ELBO()(model, guide)`` (Pyro's
``ELBOModule``) is one ``nn.Module`` for ``DistributedDataParallel``. Every rank:

* sets ``pyro.settings.set(module_local_params=True)`` (parameters live in the modules);
* builds the same model and guide, calls ``pyro_arflow.init_parameters`` on one batch, then
  wraps the ELBO module in DDP, which broadcasts rank 0's parameters and averages gradients;
* reads its shard through a ``DistributedSampler``, ``128 / world`` images a step, so the
  global batch, and the steps an epoch, are the same for any number of processes;
* scores its batch under ``pyro.plate("images", 1500, subsample=indices)``: the plate has the
  global size, so each rank's loss estimates the whole training set's negative ELBO and the
  average of the ranks' gradients is the gradient of the average of those estimates.

Rank 0 alone shows the progress bar, writes the checkpoint (the model's and the guide's state
dicts), loads it back into fresh single-process modules, and from those prints the held-out
ELBO (nats per image, 200 draws from q per image) and the seconds per epoch. The backend is
NCCL where CUDA is available (one GPU per rank), gloo on CPUs. ``--compare`` runs 1 and 2
processes on this machine one after the other (``torch.multiprocessing``) and prints both in
one table, with a plot of the training loss per epoch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from _common import parse_args, print_table, save_figure
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from vae_ar_prior import BATCH, CONTEXT, LATENT, PIXELS, TRAIN, digits, mlp

import pyro_arflow as af


class Model(PyroModule):
    """p(z) a MAF flow prior, p(x | z) Bernoulli pixels from an MLP decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = mlp(LATENT, PIXELS)
        self.prior = af.FlowPrior(LATENT, flow="maf", num_flows=2, hidden_dims=[64])

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        with pyro.plate("images", TRAIN, subsample=indices):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class Guide(PyroModule):
    """q(z | x): the encoder's diagonal Gaussian reshaped by a two-layer conditional IAF."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = mlp(PIXELS, 2 * LATENT + CONTEXT)
        self.flow = af.build_flow("iaf", LATENT, 2, context_dim=CONTEXT, hidden_dims=[64])

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw_scale, context = self.encoder(x).split([LATENT, LATENT, CONTEXT], -1)
        base = dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1)
        return dist.TransformedDistribution(base, [self.flow.condition(context)])

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        with pyro.plate("images", TRAIN, subsample=indices):
            pyro.sample("z", self.posterior(x))


@torch.no_grad()
def held_out_elbo(model: Model, guide: Guide, x: torch.Tensor, draws: int = 200) -> float:
    """The ELBO per image, averaged over the images, from ``draws`` draws of q each."""
    q = guide.posterior(x)
    z = q.rsample((draws,))
    log_joint = dist.Bernoulli(logits=model.decoder(z)).to_event(1).log_prob(x)
    log_weights = log_joint + model.prior().log_prob(z) - q.log_prob(z)
    return log_weights.mean().item()


def train(rank: int, world: int, args, device: torch.device) -> dict | None:
    """One rank's training; rank 0 returns its table row (and the loss curve)."""
    pyro.settings.set(module_local_params=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    train_x, test_x = digits()
    pyro.set_rng_seed(args.seed)  # the same modules on every rank (DDP broadcasts rank 0's)
    model, guide = Model().to(device), Guide().to(device)
    elbo = Trace_ELBO()(model, guide)
    indices = torch.arange(TRAIN)
    sampler = DistributedSampler(indices, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(indices, batch_size=BATCH // world, sampler=sampler, drop_last=True)
    first = next(iter(loader))
    af.init_parameters(elbo, train_x[first].to(device), first.to(device))
    ddp = nn.parallel.DistributedDataParallel(elbo)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=2e-3)
    epochs = max(1, math.ceil(args.steps / len(loader)))
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.1 ** (1 / epochs))
    pyro.set_rng_seed(args.seed + 1 + rank)  # each rank its own noise
    curve, start = [], time.perf_counter()
    for epoch in tqdm(range(epochs), desc=processes(world), disable=rank != 0, leave=False):
        sampler.set_epoch(epoch)
        total = 0.0
        for batch in loader:
            loss = ddp(train_x[batch].to(device), batch.to(device))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(ddp.parameters(), 10.0)
            optimizer.step()
            total += loss.item() / TRAIN
        decay.step()
        curve.append(total / len(loader))
    seconds_per_epoch = (time.perf_counter() - start) / epochs
    if rank != 0:
        return None
    checkpoint = Path(args.out) / f"distributed_vae_{world}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "guide": guide.state_dict()}, checkpoint)
    restored_model, restored_guide = Model(), Guide()  # a single process, on the CPU
    state = torch.load(checkpoint, map_location="cpu")
    restored_model.load_state_dict(state["model"])
    restored_guide.load_state_dict(state["guide"])
    return {
        "processes": world,
        "backend": torch_dist.get_backend(),
        "epochs": epochs,
        "steps": epochs * len(loader),
        "s per epoch": seconds_per_epoch,
        "train loss per image (last epoch)": curve[-1],
        "test ELBO per image (checkpoint)": held_out_elbo(restored_model, restored_guide, test_x),
        "curve": curve,
    }


def worker(rank: int, world: int, rendezvous: str, args, results: str) -> None:
    """A ``--compare`` process: join the group through a file, train, leave rank 0's row."""
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
    )
    try:
        row = train(rank, world, args, torch.device("cpu"))
    finally:
        torch_dist.destroy_process_group()
    if row is not None:
        Path(results).write_text(json.dumps(row))


def compare(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for world in (1, 2):
            results = f"{scratch}/row{world}.json"
            rendezvous = f"{scratch}/rendezvous{world}"
            torch.multiprocessing.spawn(
                worker, args=(world, rendezvous, args, results), nprocs=world
            )
            rows.append(json.loads(Path(results).read_text()))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(
        __doc__.splitlines()[0],
        default_steps=2000,
        argv=argv,
        flags={"--compare": "run 1 and 2 processes here, one after the other, and compare"},
    )
    if args.compare:
        rows = compare(args)
    else:  # under torchrun: the environment names this process's rank and the world
        cuda = torch.cuda.is_available()
        torch_dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
        try:
            row = train(rank, world, args, device or torch.device("cpu"))
        finally:
            torch_dist.destroy_process_group()
        if row is None:
            return []
        rows = [row]
    curves = {processes(row["processes"]): row.pop("curve") for row in rows}
    print_table(
        f"Data-parallel flow VAE, {rows[0]['steps']} steps of {BATCH} images in all "
        f"(seed {args.seed}); nats per image",
        rows,
        args.out,
        "distributed_vae",
    )
    plot(curves, args.out / "distributed_vae.png")
    return rows


def processes(world: int) -> str:
    return f"{world} process" if world == 1 else f"{world} processes"


def plot(curves: dict[str, list[float]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), curve, label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss per image (negative ELBO)")
    axis.set_title("The same steps on 1 and 2 processes")
    axis.legend()
    save_figure(figure, path)


if __name__ == "__main__":
    main()
