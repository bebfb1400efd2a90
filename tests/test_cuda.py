"""On a CUDA device: the same results as on the CPU, sequential solves replayed as CUDA graphs
without changing them, and validation that never synchronizes with the host.

Skipped where no CUDA device is present (CI); run on a GPU machine with plain ``pytest``.
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_arflow as af
from conftest import CONDITIONERS, CONTEXT_DIM, LAYER_KINDS, make_layer, perturb
from pyro_arflow.validation import flush_finite_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def graphs_of(module) -> int:
    return sum(
        len(m._solve_graphs._graphs) for m in module.modules() if hasattr(m, "_solve_graphs")
    )


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("conditioner", CONDITIONERS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_cuda_matches_cpu_and_graph_replays_match_the_eager_solve(kind, conditioner, conditional):
    module, transform, context = make_layer(
        kind, conditioner, 9, conditional, torch.float64, (64,), seed=1
    )
    x = torch.randn(64, 9, dtype=torch.float64, device="cpu")
    expected_y = transform(x)
    expected_x = transform.inv(expected_y.clone())
    on_gpu = copy.deepcopy(module).to(CUDA)
    gpu_context = None if context is None else context.to(CUDA)

    def gpu_transform():
        return on_gpu.condition(gpu_context) if conditional else on_gpu

    with torch.no_grad():
        for _ in range(4):  # eager, then captured, then replayed twice
            y = gpu_transform()(x.to(CUDA))
            x_back = gpu_transform().inv(y.clone())
            torch.testing.assert_close(y.cpu(), expected_y, atol=1e-10, rtol=0)
            torch.testing.assert_close(x_back.cpu(), expected_x, atol=1e-10, rtol=0)
            log_det = gpu_transform().log_abs_det_jacobian(x_back, y)
            expected_log_det = transform.log_abs_det_jacobian(expected_x, expected_y)
            torch.testing.assert_close(log_det.cpu(), expected_log_det, atol=1e-10, rtol=0)
    assert graphs_of(on_gpu) == 1  # one sequential direction, one shape: one graph


def test_replays_follow_in_place_updates_and_moved_tensors():
    layer = perturb(af.maf(12, hidden_dims=[32, 32])).to(CUDA)
    z = torch.randn(128, 12, device=CUDA)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        with torch.no_grad():
            sampled = layer(z.clone())  # replayed from the second call on
        with torch.no_grad():
            layer.conditioner.recur_method = "passes"  # the eager D-pass reference
            reference = layer(z.clone())
            layer.conditioner.recur_method = "incremental"
        torch.testing.assert_close(sampled, reference, atol=1e-5, rtol=1e-5)
        loss = -layer.log_abs_det_jacobian(z, layer(z.clone())).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # in place: the graph sees it
    moved = layer.double()  # new tensors: new graphs, never the stale ones
    with torch.no_grad():
        for _ in range(3):
            sampled = moved(z.double())
        moved.conditioner.recur_method = "passes"
        torch.testing.assert_close(sampled, moved(z.double()), atol=1e-10, rtol=0)


def test_the_long_lstm_solve_is_captured_and_exact():
    conditioner = perturb(af.LSTMConditioner(512, hidden_size=16), std=0.1).to(CUDA)

    def push(loc, raw, w):
        return loc + torch.nn.functional.softplus(raw) * w

    w = torch.randn(32, 512, device=CUDA)
    with torch.no_grad():
        results = [conditioner.recur(w, push) for _ in range(3)]
        u, loc, raw = results[-1]
        forward_loc, forward_raw = conditioner(u)
    assert graphs_of(conditioner) == 1
    for eager, replayed in zip(results[0], results[-1], strict=True):
        torch.testing.assert_close(replayed, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loc, forward_loc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(raw, forward_raw, atol=1e-5, rtol=1e-5)


def test_validation_never_synchronizes_and_still_reports():
    layer = perturb(af.iaf(10, hidden_dims=[32])).to(CUDA)
    x = torch.randn(256, 10, device=CUDA)
    with torch.no_grad():
        for _ in range(3):
            layer.inv(layer(x.clone()))  # capture the inverse's graph first: capturing syncs
    flush_finite_checks()  # fewer checks follow than fill a bank: none waits for a copy
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x.clone())
        y.sum().backward()
        with torch.no_grad():
            layer.inv(y.detach().clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = x.clone()
    bad[3, 4] = float("nan")
    layer(bad)  # no error yet: the flag is on its way to the host
    with pytest.raises(ValueError, match="got an input with non-finite entries"):
        flush_finite_checks()


def test_a_guide_and_a_prior_train_on_cuda():
    data = torch.randn(20, device=CUDA) + 1.0

    def model():
        scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, device=CUDA), 1.0))
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2, device=CUDA), 1.0).to_event(1))
        with pyro.plate("data", 20):
            pyro.sample("obs", dist.Normal(loc.sum(-1, keepdim=True).squeeze(-1), scale), obs=data)

    for flow in ("iaf", "iaf-lstm"):
        pyro.clear_param_store()
        guide = af.AutoARFlow(model, flow=flow)
        svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
        losses = [svi.step() for _ in range(200)]
        assert sum(losses[-20:]) < sum(losses[:20])
        assert guide.loc.is_cuda and all(p.is_cuda for p in guide.flow.parameters())
        assert guide.median()["scale"].is_cuda
    prior = af.FlowPrior(3, context_dim=CONTEXT_DIM, hidden_dims=[8]).to(CUDA)
    context = torch.randn(5, CONTEXT_DIM, device=CUDA)
    sample = prior(context).sample()
    assert sample.shape == (5, 3) and sample.is_cuda
    assert torch.isfinite(prior(context).log_prob(sample)).all()


def test_deferred_checks_name_the_failing_call_among_many():
    layer = af.iaf(6, hidden_dims=[8]).to(CUDA)
    flush_finite_checks()
    x = torch.randn(32, 6, device=CUDA)
    inputs = []  # kept alive, so that the late diagnosis can still look at the culprit
    for call in range(100):  # several banks of deferred checks come and go
        inputs.append(x.clone())
        if call == 57:
            inputs[-1][0, 0] = float("inf")
        try:
            layer(inputs[-1])
        except ValueError as error:  # a later call may already report it
            assert "got an input with non-finite entries" in str(error)
            break
    else:
        with pytest.raises(ValueError, match="got an input with non-finite entries"):
            flush_finite_checks()
    flush_finite_checks()  # the failure was reported once; nothing is left over
