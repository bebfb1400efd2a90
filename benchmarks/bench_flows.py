"""Both directions of one autoregressive layer, against Pyro, zuko and the plain-MLP floor.

    python benchmarks/bench_flows.py                 # the bench extra: pip install -e '.[bench]'
    python benchmarks/bench_flows.py --device cuda   # the same tables on a GPU

Setting: D = 64, two hidden layers of 256 units, float32; batch 4096 (and 65536 on a GPU).

* Parallel direction (IAF forward / MAF density): our masked layer, Pyro's
  ``AffineAutoregressive``, zuko's ``MAF`` (one transform) and nflows'
  ``MaskedAffineAutoregressiveTransform``, each with its log-determinant, and
  the floor, an unmasked MLP of the same shape alone (in-place ReLU, as ours; the stock
  ``nn.ReLU()`` MLP is printed too); timed without and with a backward pass, the methods
  taking turns in a rotating order.
* Sequential direction (sampling): every layer is first fitted by maximum likelihood to a
  Gaussian AR(1) with coefficient 0.9 (nobody is timed at the identity); then 4096 samples are
  drawn. Ours runs its incremental solve and, as a reference, the D-pass fixed point; the
  peers run D network passes. The max inverse error is |T^-1(T(z)) - z| through each layer's
  own parallel direction.
* Scale maps: our IAF's parallel direction with each of them, without and with a backward
  pass (the default scale map is chosen by this table and by stability; README).
* The long-path conditioners, LSTM (hidden 64) and causal convolutions (32 channels, 4
  layers), both directions, D = 256, 1024, 4096, batch 256, with their parameter counts; on
  a GPU the LSTM's sequential direction also without CUDA graphs, to show what they buy.

Times are medians of repeated runs (wall clock on the CPU, CUDA events on a GPU); ratios are
printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import pyro.distributions as dist
import torch
import zuko
from _timing import describe_machine, interleaved_medians, warm_up
from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from pyro.distributions.transforms import affine_autoregressive
from torch import nn

import pyro_arflow as af
from pyro_arflow.conditioners import ConvConditioner, LSTMConditioner
from pyro_arflow.scales import SCALE_MAPS

DIM, HIDDEN, BATCH = 64, [256, 256], 4096
DEVICE = "cpu"  # set by --device


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return interleaved_medians({"": fn}, repeats, DEVICE)[""]


def ar1_samples(n: int, coefficient: float = 0.9) -> torch.Tensor:
    """Stationary Gaussian AR(1) vectors of length DIM with unit marginal variance."""
    noise = torch.randn(n, DIM)
    x = torch.empty(n, DIM)
    x[:, 0] = noise[:, 0]
    innovation = (1 - coefficient**2) ** 0.5
    for i in range(1, DIM):
        x[:, i] = coefficient * x[:, i - 1] + innovation * noise[:, i]
    return x


class Candidate:
    """One method: how to score data (parallel), how to sample (sequential), how to invert."""

    def __init__(self, name: str, module: nn.Module, log_prob, sample, to_noise) -> None:
        self.name, self.module = name, module
        self.log_prob, self.sample, self.to_noise = log_prob, sample, to_noise

    def fit(self, steps: int, data: torch.Tensor) -> float:
        optimizer = torch.optim.Adam(self.module.parameters(), lr=1e-3)
        data = data.to(DEVICE)
        for _ in range(steps):
            batch = data[torch.randint(len(data), (512,))]
            loss = -self.log_prob(batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.item()


def standard_normal() -> dist.Distribution:
    return dist.Normal(torch.zeros(DIM, device=DEVICE), 1.0).to_event(1)


def ours(recur_method: str = "incremental") -> Candidate:
    layer = af.maf(DIM, hidden_dims=HIDDEN, recur_method=recur_method).to(DEVICE)
    flow = dist.TransformedDistribution(standard_normal(), [layer])
    return Candidate(
        "pyro-arflow MAF", layer, flow.log_prob, lambda z: layer(z), lambda x: layer.inv(x)
    )


def pyro_maf() -> Candidate:
    layer = affine_autoregressive(DIM, hidden_dims=HIDDEN).to(DEVICE)  # IAF; .inv: a MAF
    flow = dist.TransformedDistribution(standard_normal(), [layer.inv])
    return Candidate(
        "Pyro AffineAutoregressive",
        layer,
        flow.log_prob,
        lambda z: layer.inv(z),
        lambda x: layer(x),
    )


def zuko_maf() -> Candidate:
    flow = zuko.flows.MAF(features=DIM, transforms=1, hidden_features=tuple(HIDDEN)).to(DEVICE)
    return Candidate(
        "zuko MAF",
        flow,
        lambda x: flow().log_prob(x),
        lambda z: flow.transform().inv(z),
        lambda x: flow.transform()(x),
    )


def nflows_transform() -> MaskedAffineAutoregressiveTransform:
    """Two masked hidden layers of 256 (the input layer and one non-residual block)."""
    return MaskedAffineAutoregressiveTransform(
        features=DIM,
        hidden_features=HIDDEN[0],
        num_blocks=len(HIDDEN) - 1,
        use_residual_blocks=False,
    ).to(DEVICE)


def nflows_maf() -> Candidate:
    transform = nflows_transform()

    def log_prob(x):
        z, log_det = transform(x)
        return standard_normal().log_prob(z) + log_det

    return Candidate(
        "nflows MAF",
        transform,
        log_prob,
        lambda z: transform.inverse(z)[0],
        lambda x: transform(x)[0],
    )


def mlp_floor(inplace: bool = True) -> nn.Module:
    """The same network unmasked; the floor proper is written as tightly as ours (in-place
    ReLU), the stock ``nn.ReLU()`` version is printed beside it."""
    return nn.Sequential(
        nn.Linear(DIM, HIDDEN[0]),
        nn.ReLU(inplace=inplace),
        nn.Linear(HIDDEN[0], HIDDEN[1]),
        nn.ReLU(inplace=inplace),
        nn.Linear(HIDDEN[1], 2 * DIM),
    ).to(DEVICE)


def with_log_det(layer, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        u = x.clone()  # a fresh tensor: no transform answers from its cache
        y = layer(u)
        return y.sum() + layer.log_abs_det_jacobian(u, y).sum()

    return run


def without_and_with_backward(
    runs: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of each run without gradients, then with a backward pass of its result."""
    with torch.no_grad():
        no_grad = interleaved_medians(runs, repeats, DEVICE)
    backward_runs = {k: (lambda f=f: f().backward()) for k, f in runs.items()}
    return no_grad, interleaved_medians(backward_runs, repeats, DEVICE)


def parallel_table(repeats: int, batch: int) -> None:
    """Forward + log-determinant of one layer in its one-pass direction (an IAF's sampling)."""
    x = torch.randn(batch, DIM, device=DEVICE)
    floor, stock_mlp = mlp_floor(), mlp_floor(inplace=False)
    layers = {
        "pyro-arflow IAF": af.iaf(DIM, hidden_dims=HIDDEN).to(DEVICE),
        "Pyro AffineAutoregressive": affine_autoregressive(DIM, hidden_dims=HIDDEN).to(DEVICE),
    }
    zuko_transform = zuko.flows.MAF(features=DIM, transforms=1, hidden_features=tuple(HIDDEN)).to(
        DEVICE
    )

    runs = {
        "unmasked MLP (floor)": lambda: floor(x.clone()).sum(),
        "unmasked MLP, nn.ReLU()": lambda: stock_mlp(x.clone()).sum(),
    }
    runs.update({name: with_log_det(layer, x) for name, layer in layers.items()})

    def zuko_run():
        y, ladj = zuko_transform.transform().call_and_ladj(x.clone())
        return y.sum() + ladj.sum()

    runs["zuko MAF"] = zuko_run
    nflows_layer = nflows_transform()

    def nflows_run():
        y, log_det = nflows_layer(x.clone())
        return y.sum() + log_det.sum()

    runs["nflows MAF"] = nflows_run
    no_grad, train = without_and_with_backward(runs, repeats)
    print(f"\nParallel direction (forward + log-det), D={DIM}, hidden={HIDDEN}, batch={batch}")
    print(f"{'method':28s} {'no-grad ms':>11s} {'x floor':>8s} {'fwd+bwd ms':>11s} {'x floor':>8s}")
    floor_name = "unmasked MLP (floor)"
    for name in runs:
        print(
            f"{name:28s} {no_grad[name]:11.3f} {no_grad[name] / no_grad[floor_name]:8.2f} "
            f"{train[name]:11.3f} {train[name] / train[floor_name]:8.2f}"
        )
    for peer in ("Pyro AffineAutoregressive", "zuko MAF", "nflows MAF", "unmasked MLP, nn.ReLU()"):
        print(
            f"ours / {peer}: {no_grad['pyro-arflow IAF'] / no_grad[peer]:.2f} (no grad), "
            f"{train['pyro-arflow IAF'] / train[peer]:.2f} (fwd+bwd)"
        )


def sequential_table(steps: int, repeats: int) -> None:
    data = ar1_samples(20000)
    candidates = [ours(), pyro_maf(), zuko_maf(), nflows_maf()]
    print(
        f"\nSequential direction (sampling) after {steps} fitting steps "
        "on a Gaussian AR(1), rho=0.9"
    )
    exact_nll = (
        -dist.MultivariateNormal(torch.zeros(DIM), torch.cov(data.T))
        .log_prob(data[:2000])
        .mean()
        .item()
    )
    z = torch.randn(BATCH, DIM, device=DEVICE)
    print(f"{'method':28s} {'train NLL':>10s} {'ms':>9s} {'net passes':>16s} {'max inv err':>12s}")
    times = {}
    for c in candidates:
        nll = c.fit(steps, data)
        with torch.no_grad():
            times[c.name] = median_ms(lambda c=c: c.sample(z.clone()), repeats)
            error = (c.to_noise(c.sample(z.clone()).clone()) - z).abs().max().item()
        passes = "~1 (D steps)" if c is candidates[0] else f"{DIM}"
        print(f"{c.name:28s} {nll:10.2f} {times[c.name]:9.2f} {passes:>16s} {error:12.2e}")
    fitted = candidates[0].module
    with torch.no_grad():
        fast = fitted(z.clone())
        fitted.conditioner.recur_method = "passes"
        reference_ms = median_ms(lambda: fitted(z.clone()), max(1, repeats // 2))
        reference = fitted(z.clone())
        fitted.conditioner.recur_method = "incremental"
        in_float64 = copy.deepcopy(fitted).double()(z.double())
    name = "pyro-arflow MAF, D passes"
    print(f"{name:28s} {'':10s} {reference_ms:9.2f} {DIM:>16d} {'':12s}")
    print(f"(exact NLL of the fitted Gaussian on the data: {exact_nll:.2f})")

    def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b.double()).abs().max().item()

    print(
        "incremental vs D-pass result on the fitted layer: max |diff| = "
        f"{max_diff(fast, reference):.2e}; against the float64 solve: incremental "
        f"{max_diff(fast, in_float64):.2e}, D passes {max_diff(reference, in_float64):.2e}"
    )
    ours_ms = times[candidates[0].name]
    for peer in candidates[1:]:
        print(f"ours / {peer.name}: {ours_ms / times[peer.name]:.3f}")
    print(f"incremental / D passes (ours): {ours_ms / reference_ms:.3f}")


def scale_map_table(repeats: int, batch: int) -> None:
    """Our IAF's parallel direction with each scale map: what the map costs at this size."""
    x = torch.randn(batch, DIM, device=DEVICE)
    runs = {
        name: with_log_det(af.iaf(DIM, hidden_dims=HIDDEN, scale_map=name).to(DEVICE), x)
        for name in sorted(SCALE_MAPS)
    }
    no_grad, train = without_and_with_backward(runs, repeats)
    print(f"\nScale maps: our IAF's parallel direction, batch={batch}")
    print(f"{'scale map':12s} {'no-grad ms':>11s} {'fwd+bwd ms':>11s}")
    for name in runs:
        print(f"{name:12s} {no_grad[name]:11.3f} {train[name]:11.3f}")


def push(loc, raw, noise):
    return loc + torch.nn.functional.softplus(raw) * noise


LONG_PATH_CONDITIONERS = {
    "LSTM conditioner, hidden 64": lambda dim: LSTMConditioner(dim, hidden_size=64),
    "Conv conditioner, 32 channels, 4 layers": lambda dim: ConvConditioner(dim),
}


def long_path_table(repeats: int) -> None:
    batch, dims = 256, (256, 1024, 4096)
    for title, make in LONG_PATH_CONDITIONERS.items():
        print(f"\n{title}, batch 256 (one layer, no grad; sizes take turns)")
        runs, sizes = {}, {}
        for dim in dims:
            conditioner = make(dim).to(DEVICE)
            sizes[dim] = sum(p.numel() for p in conditioner.parameters())
            u = torch.randn(batch, dim, device=DEVICE)
            runs[("forward", dim)] = lambda c=conditioner, u=u: c(u)
            runs[("recur", dim)] = lambda c=conditioner, u=u: c.recur(u, push)
        with torch.no_grad():
            ms = interleaved_medians(runs, max(5, repeats // 2), DEVICE)
        print(f"{'D':>6s} {'parameters':>11s} {'forward ms':>11s} {'recur ms':>10s}")
        for dim in dims:
            print(
                f"{dim:6d} {sizes[dim]:11d} {ms[('forward', dim)]:11.2f} {ms[('recur', dim)]:10.2f}"
            )
        forward_growth = ms[("forward", 4096)] / ms[("forward", 1024)]
        recur_growth = ms[("recur", 4096)] / ms[("recur", 1024)]
        print(
            f"time(4096) / time(1024): forward {forward_growth:.2f}, recur {recur_growth:.2f} "
            "(linear growth = 4)"
        )
    if torch.device(DEVICE).type == "cuda":
        eager = LSTMConditioner(4096, hidden_size=64).to(DEVICE)
        eager.use_cuda_graphs = False
        u = torch.randn(batch, 4096, device=DEVICE)
        with torch.no_grad():
            eager_ms = median_ms(lambda: eager.recur(u, push), 3)
        print(
            f"recur at D=4096 without CUDA graphs: {eager_ms:.1f} ms "
            f"({1000 * eager_ms / 4096:.0f} us a step); with them {ms[('recur', 4096)]:.1f} ms"
        )


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    DEVICE = args.device
    torch.manual_seed(args.seed)
    print(describe_machine(DEVICE))
    warm_up(DEVICE)
    batches = [BATCH] if torch.device(DEVICE).type == "cpu" else [BATCH, 16 * BATCH]
    for batch in batches:  # cheap per call, and the most sensitive to noise: more repeats
        parallel_table(4 * args.repeats, batch)
    sequential_table(args.fit_steps, args.repeats)
    for batch in batches:
        scale_map_table(4 * args.repeats, batch)
    long_path_table(args.repeats)


if __name__ == "__main__":
    main()
