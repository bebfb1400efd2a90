"""Sticking the landing: the same expected gradient as Trace_ELBO, a variance that vanishes at
the exact posterior, for flat and prior-structured guides."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_arflow as af
from conftest import DEVICE, perturb
from pyro_arflow.landing import detached_parameters

OBSERVED = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
NOISE_SD = 0.5


def conjugate_model() -> None:
    """x ~ N(0, I), y ~ N(x, 0.5^2 I): the posterior is N(0.8 y, 0.2 I)."""
    x = pyro.sample("x", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(x, NOISE_SD).to_event(1), obs=OBSERVED.to(DEVICE))


def path_model() -> None:
    """A global scale and a 4-step AR(1) path observed with noise."""
    shock = pyro.sample("shock", dist.LogNormal(torch.tensor(-1.0, dtype=torch.float64), 0.3))
    path = af.GaussianPath(lambda h, t: (0.7 * h, shock), dist.Normal(0.0, shock), 4)
    h = pyro.sample("h", path)
    pyro.sample("y", dist.Normal(h, NOISE_SD).to_event(1), obs=OBSERVED[:1].repeat(4).to(DEVICE))


def gradient_batches(model, guide, batches: int, particles: int) -> torch.Tensor:
    """``(batches, parameters)``: each row the mean gradient of the loss over ``particles``
    draws."""
    parameters = [p for p in guide.parameters() if p.requires_grad]
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    rows = []
    for _ in range(batches):
        grads = torch.autograd.grad(elbo.differentiable_loss(model, guide), parameters)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def build(model, stl: bool, **kwargs) -> af.AutoARFlow:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        guide = af.AutoARFlow(model, hidden_dims=[8], sticking_the_landing=stl, **kwargs)
        guide()
    return guide


@pytest.mark.parametrize("model", [conjugate_model, path_model], ids=["flat", "path"])
def test_the_expected_gradient_is_trace_elbos(model):
    """Away from the posterior (a flow moved off the identity, the affine off the posterior)
    the two estimators' means agree within their Monte Carlo error."""
    means, errors = [], []
    for stl in (False, True):
        with pyro.settings.context(module_local_params=True):
            guide = build(model, stl)
            perturb(guide, std=0.2, seed=1)
            pyro.set_rng_seed(2)
            batches = gradient_batches(model, guide, batches=60, particles=50)
        means.append(batches.mean(0))
        errors.append(batches.std(0) / len(batches) ** 0.5)
    difference = (means[0] - means[1]).abs()
    bound = 4.5 * (errors[0] ** 2 + errors[1] ** 2).sqrt() + 1e-9
    assert torch.all(difference <= bound), (difference / bound).max()
    assert means[0].abs().max() > 0.1  # a real gradient was compared, not zeros


def test_the_gradient_variance_vanishes_at_the_exact_posterior():
    """At q = the exact posterior (the flow at the identity, the affine at N(0.8 y, 0.2 I))
    every draw of the sticking-the-landing gradient is zero; Trace_ELBO's is not."""
    variances = []
    for stl in (False, True):
        with pyro.settings.context(module_local_params=True):
            guide = build(conjugate_model, stl)
            guide.loc = (0.8 * OBSERVED).to(DEVICE)
            guide.scale = torch.full((3,), 0.2**0.5, dtype=torch.float64, device=DEVICE)
            batches = gradient_batches(conjugate_model, guide, batches=20, particles=1)
        variances.append(batches.var(0).sum())
    assert variances[0] > 1.0
    assert variances[1] < 1e-12 * variances[0]


def test_parameters_are_detached_only_inside_the_block():
    layer = af.iaf(3, hidden_dims=[4])
    parameters = list(layer.parameters())
    with pytest.raises(RuntimeError, match="inside"):
        with detached_parameters([layer]):
            assert not any(p.requires_grad for p in layer.parameters())
            raise RuntimeError("inside")
    assert list(layer.parameters()) == parameters
    assert all(p.requires_grad for p in layer.parameters())
