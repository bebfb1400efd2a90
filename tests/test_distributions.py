"""GaussianAutoregressive: its density, its flow form, and a closed-form AR(p) check."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch.distributions import MultivariateNormal

import pyro_arflow as af
from conftest import CONDITIONERS, CONTEXT_DIM, SMALL_NET, perturb
from pyro_arflow.conditioners import MaskedConditioner, make_conditioner
from pyro_arflow.scales import SCALE_MAPS, make_scale_map


def linear_ar_conditioner(coefficients: list[float], intercept: float, sigma: float, dim: int):
    """x_i | x_<i ~ N(intercept + sum_k a_k x_{i-k}, sigma^2), written into a linear MADE."""
    conditioner = MaskedConditioner(dim, hidden_dims=[]).double()
    raw = make_scale_map("softplus").raw_for(torch.tensor(sigma, dtype=torch.float64))
    weight = torch.zeros(2 * dim, dim, dtype=torch.float64)
    for lag, a in enumerate(coefficients, start=1):
        weight[:dim, :dim] += a * torch.diag(torch.ones(dim - lag, dtype=torch.float64), -lag)
    with torch.no_grad():
        conditioner.output.weight.copy_(weight / conditioner.output.gain)
        conditioner.output.bias.copy_(
            torch.cat([torch.full((dim,), intercept, dtype=torch.float64), raw.expand(dim)])
        )
    return conditioner


def ar_closed_form(coefficients, intercept, sigma, dim) -> MultivariateNormal:
    """(I - A) x = intercept + sigma z, with A the strictly lower lag matrix."""
    lags = torch.zeros(dim, dim, dtype=torch.float64)
    for lag, a in enumerate(coefficients, start=1):
        lags += a * torch.diag(torch.ones(dim - lag, dtype=torch.float64), -lag)
    inverse = torch.linalg.inv(torch.eye(dim, dtype=torch.float64) - lags)
    mean = inverse @ torch.full((dim,), intercept, dtype=torch.float64)
    return MultivariateNormal(mean, scale_tril=sigma * inverse)


def test_log_prob_equals_closed_form_ar2_density():
    coefficients, intercept, sigma, dim = [0.6, -0.3], 0.4, 0.7, 12
    p = af.GaussianAutoregressive(linear_ar_conditioner(coefficients, intercept, sigma, dim))
    exact = ar_closed_form(coefficients, intercept, sigma, dim)
    x = exact.sample((50,))
    torch.testing.assert_close(p.log_prob(x), exact.log_prob(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(p.as_flow().log_prob(x), exact.log_prob(x), atol=1e-10, rtol=0)


def test_rsample_has_the_closed_form_moments():
    coefficients, intercept, sigma, dim = [0.9], 0.2, 0.5, 8
    p = af.GaussianAutoregressive(linear_ar_conditioner(coefficients, intercept, sigma, dim))
    exact = ar_closed_form(coefficients, intercept, sigma, dim)
    x = p.rsample((40000,))
    # standard errors: mean ~ 1.1 / sqrt(4e4) = 0.006, covariance entries ~ 0.01
    torch.testing.assert_close(x.mean(0), exact.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), exact.covariance_matrix, atol=0.05, rtol=0)


@pytest.mark.parametrize("scale_map", sorted(SCALE_MAPS))
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("conditioner_name", CONDITIONERS)
def test_log_prob_equals_its_flow_form(conditioner_name, conditional, scale_map):
    dim = 7
    conditioner = make_conditioner(
        conditioner_name, dim, CONTEXT_DIM if conditional else None, **SMALL_NET[conditioner_name]
    )
    perturb(conditioner.double())
    context = torch.randn(4, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    p = af.GaussianAutoregressive(conditioner, context, scale_map=scale_map)
    x = p.rsample((5,))
    expected_shape = (5, 4) if conditional else (5,)
    assert x.shape == expected_shape + (dim,)
    flow = p.as_flow()
    assert flow.batch_shape == p.batch_shape and flow.event_shape == p.event_shape
    torch.testing.assert_close(p.log_prob(x), flow.log_prob(x), atol=1e-12, rtol=0)
    # the same noise gives the same sample through the flow's transform
    pyro.set_rng_seed(1)
    sample = p.rsample((3,))
    pyro.set_rng_seed(1)
    noise = torch.randn(sample.shape, dtype=torch.float64)
    torch.testing.assert_close(flow.transforms[0](noise), sample, atol=1e-12, rtol=0)


def test_batch_shapes_and_expand():
    conditioner = perturb(MaskedConditioner(3, [8], context_dim=2))
    p = af.GaussianAutoregressive(conditioner, torch.randn(2, 4, 2))
    assert p.batch_shape == (2, 4) and p.event_shape == (3,)
    assert p.log_prob(torch.randn(2, 4, 3)).shape == (2, 4)
    assert p.rsample((5,)).shape == (5, 2, 4, 3)
    unconditional = af.GaussianAutoregressive(perturb(MaskedConditioner(3, [8])))
    expanded = unconditional.expand((6,))
    assert expanded.rsample().shape == (6, 3)
    assert expanded.log_prob(torch.randn(3)).shape == (6,)
    with pyro.plate("data", 6):
        assert pyro.sample("x", unconditional).shape == (6, 3)


def test_rsample_carries_gradients_to_the_network():
    conditioner = perturb(make_conditioner("lstm", 4, hidden_size=8))
    af.GaussianAutoregressive(conditioner).rsample((10,)).square().sum().backward()
    for name, parameter in conditioner.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="context_dim=2.*None"):
        af.GaussianAutoregressive(MaskedConditioner(3, context_dim=2))
    with pytest.raises(ValueError, match=r"context_dim=None.*\(2,\)"):
        af.GaussianAutoregressive(MaskedConditioner(3), torch.randn(2))
    with pytest.raises(ValueError, match=r"event_shape.*\[4\].*\[3\]"):
        af.GaussianAutoregressive(MaskedConditioner(3)).log_prob(torch.randn(4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        af.GaussianAutoregressive(MaskedConditioner(3), validate_args=False).log_prob(torch.ones(4))
