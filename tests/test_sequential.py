"""The masked conditioner's incremental sequential solve agrees with the D-pass fixed point."""

from __future__ import annotations

import pytest
import torch

import pyro_arflow as af
from conftest import CONTEXT_DIM, perturb
from pyro_arflow import _graphs
from pyro_arflow.conditioners import MaskedConditioner


def both_ways(conditioner: MaskedConditioner, w, solve, context=None):
    results = {}
    for method in ("incremental", "passes"):
        conditioner.recur_method = method
        results[method] = conditioner.recur(w, solve, context)
    conditioner.recur_method = "incremental"
    return results["incremental"], results["passes"]


def push(loc, raw, z):
    return loc + torch.nn.functional.softplus(raw) * z


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden_dims": [32, 32]},
        {"hidden_dims": [12]},  # D - 1 units, the fewest allowed: one unit per degree
        {"hidden_dims": []},
        {"hidden_dims": [24, 24, 24], "residual": True},
        {"hidden_dims": [32], "ordering": "reversed"},
        {"hidden_dims": [32, 16], "ordering": "random", "seed": 3},
        {"hidden_dims": [32], "context_dim": CONTEXT_DIM},
        {"hidden_dims": [], "context_dim": CONTEXT_DIM, "ordering": "random"},
    ],
    ids=str,
)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "in-place"])
def test_incremental_equals_d_passes_on_random_layers(kwargs, dtype, tol, grad):
    """With autograd the solve appends blocks; without, it writes them in place: both exact."""
    dim = 13
    conditioner = perturb(MaskedConditioner(dim, **kwargs), std=0.5).to(dtype)
    context = torch.randn(6, CONTEXT_DIM, dtype=dtype) if "context_dim" in kwargs else None
    w = torch.randn(6, dim, dtype=dtype)
    with torch.set_grad_enabled(grad):
        fast, reference = both_ways(conditioner, w, push, context)
    assert fast[0].requires_grad == grad
    # random residual stacks reach values of 30 to 60, where one float32 step is 2e-6 to 4e-6:
    # the tolerance is relative above 1, absolute below
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_incremental_equals_d_passes_on_a_fitted_maf(dtype, tol):
    """A MAF fitted to a Gaussian AR(1) with coefficient 0.9 (far from the identity)."""
    torch.manual_seed(0)
    dim = 24
    noise = torch.randn(4096, dim, dtype=dtype)
    data = torch.empty_like(noise)
    data[:, 0] = noise[:, 0]
    for i in range(1, dim):
        data[:, i] = 0.9 * data[:, i - 1] + 0.44 * noise[:, i]
    layer = af.maf(dim, hidden_dims=[64, 64], ordering="reversed").to(dtype)
    base = torch.distributions.Normal(torch.zeros(dim, dtype=dtype), 1.0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=3e-3)
    for _ in range(300):
        batch = data[torch.randint(len(data), (256,))]
        x = layer.inv(batch)
        loss = -(base.log_prob(x).sum(-1) - layer.log_abs_det_jacobian(x, batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # fitted: the identity layer scores about 34 nats here, the exact AR(1) density 15.2
    assert loss.item() < 22.0
    z = torch.randn(512, dim, dtype=dtype)
    with torch.no_grad():
        fast = layer(z.clone())
        layer.conditioner.recur_method = "passes"
        reference = layer(z.clone())
    torch.testing.assert_close(fast, reference, atol=tol, rtol=0)


def test_incremental_solve_carries_exact_gradients():
    """Gradients of a MAF sample match those of the D-pass solve (which are exact)."""
    layer = perturb(af.maf(6, hidden_dims=[16, 16]), std=0.4).double()
    z = torch.randn(5, 6, dtype=torch.float64)
    grads = {}
    for method in ("incremental", "passes"):
        layer.conditioner.recur_method = method
        layer.zero_grad()
        layer(z.clone()).square().sum().backward()
        grads[method] = [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["incremental"], grads["passes"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_unknown_recur_method_raises_value_error():
    with pytest.raises(ValueError, match="recur_method must be one of.*'newton'"):
        MaskedConditioner(3, recur_method="newton")


def test_solve_graph_bookkeeping(monkeypatch):
    """Capture on the second sight of a key, replay after; moved tensors drop the graphs.

    The graph itself needs CUDA (tests/test_cuda.py); here a stand-in records what happens.
    """
    events = []

    class RecordingGraph:
        def __init__(self, run, inputs):
            events.append("capture")
            self.run = run

        def replay(self, inputs):
            events.append("replay")
            return self.run(*inputs)

    monkeypatch.setattr(_graphs, "_Graph", RecordingGraph)
    graphs = _graphs.SolveGraphs(max_graphs=2)
    module = torch.nn.Linear(2, 2)

    def run(x, context):
        events.append("eager")
        return (module(x),)

    x = torch.randn(3, 2)
    for _ in range(3):
        graphs.run(module, "solve", run, x, None)
    assert events == ["eager", "capture", "replay", "eager", "replay", "eager"]
    events.clear()
    graphs.run(module, "solve", run, torch.randn(5, 2), None)  # a new shape: a new key
    assert events == ["eager"]
    module.double()  # new parameter tensors: every graph is stale
    events.clear()
    graphs.run(module, "solve", run, x.double(), None)
    assert events == ["eager"] and not graphs._graphs
    assert not _graphs.SolveGraphs.applicable(torch.randn(3, 2, device="cpu"))  # CUDA only


def test_a_graph_is_never_replayed_for_another_recur_method(monkeypatch):
    """The D-pass reference must run its own solve, not the incremental one's graph."""
    captured = []

    class RecordingGraph:
        def __init__(self, run, inputs):
            self.run = run
            captured.append(conditioner.recur_method)

        def replay(self, inputs):
            return self.run(*inputs)

    monkeypatch.setattr(_graphs, "_Graph", RecordingGraph)
    monkeypatch.setattr(_graphs.SolveGraphs, "applicable", staticmethod(lambda first: True))
    conditioner = perturb(MaskedConditioner(5, [8]))
    w = torch.randn(3, 5)
    with torch.no_grad():
        for method in ("incremental", "passes", "incremental", "passes"):
            conditioner.recur_method = method
            conditioner.recur(w, push)
    assert captured == ["incremental", "passes"]  # one graph each, captured at second sight
