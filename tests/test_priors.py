"""FlowPrior: its density is the flow's, it trains inside a model, it round-trips."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import perturb
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

import pyro_arflow as af


def change_of_variables_log_prob(prior, context, z):
    """log N(f^-1(z)) + log|det d f^-1 / dz|, the Jacobian taken by autograd."""
    inverse = prior.flow.condition(context).inv if context is not None else prior.flow.inv
    x = inverse(z)
    jacobian = torch.autograd.functional.jacobian(inverse, z)
    base = dist.Normal(torch.zeros_like(x), 1.0).to_event(1).log_prob(x)
    return base + torch.linalg.slogdet(jacobian).logabsdet


@pytest.mark.parametrize("flow", ["maf", "maf-lstm", "iaf"])
@pytest.mark.parametrize("context_dim", [None, 2])
def test_log_prob_is_the_flows_change_of_variables(flow, context_dim):
    kwargs = {"hidden_size": 6} if flow.endswith("lstm") else {"hidden_dims": [12]}
    prior = perturb(
        af.FlowPrior(4, flow=flow, num_flows=2, context_dim=context_dim, **kwargs).double()
    )
    context = torch.randn(2, dtype=torch.float64) if context_dim else None
    p = prior(context)
    for z in torch.randn(3, 4, dtype=torch.float64):
        expected = change_of_variables_log_prob(prior, context, z)
        torch.testing.assert_close(p.log_prob(z), expected, atol=1e-10, rtol=0)


def test_single_maf_prior_equals_the_gaussian_autoregressive_density():
    prior = perturb(af.FlowPrior(5, num_flows=1, context_dim=3, hidden_dims=[16]).double())
    context = torch.randn(7, 3, dtype=torch.float64)
    z = torch.randn(7, 5, dtype=torch.float64)
    layer = prior.flow[0]  # the MAF layer's own conditioner, read directly as an AR model
    direct = af.GaussianAutoregressive(layer.conditioner, context, layer.scale_map)
    torch.testing.assert_close(prior(context).log_prob(z), direct.log_prob(z), atol=1e-12, rtol=0)


def test_conditional_prior_trains_inside_a_model():
    """Latent z_n ~ p(z | c_n); data x_n = z_n + noise. The prior learns how z shifts with c."""
    torch.manual_seed(0)
    context = torch.randn(64, 2)
    truth = torch.stack([2 * context[:, 0], -context[:, 1]], -1)
    data = truth + 0.1 * torch.randn(64, 2)
    prior = af.FlowPrior(2, context_dim=2, hidden_dims=[16])

    def model():
        with pyro.plate("data", 64):
            z = pyro.sample("z", prior(context))
            pyro.sample("x", dist.Normal(z, 0.1).to_event(1), obs=data)

    guide = AutoNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    before = prior(context).log_prob(truth).mean().item()
    losses = [svi.step() for _ in range(300)]
    after = prior(context).log_prob(truth).mean().item()
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-20:]) < sum(losses[:20])
    assert after > before + 0.5  # the prior moved its mass towards the context-dependent truth
    flow_names = {name for name in pyro.get_param_store().keys() if "flow" in name}
    assert len(flow_names) == len(list(prior.flow.parameters()))


def test_state_dict_round_trip_and_bad_context():
    prior = perturb(af.FlowPrior(3, context_dim=2, hidden_dims=[8], permutation="random", seed=4))
    clone = af.FlowPrior(3, context_dim=2, hidden_dims=[8], permutation="random", seed=5)
    clone.load_state_dict(prior.state_dict())
    context, z = torch.randn(2), torch.randn(3)
    assert torch.equal(clone(context).log_prob(z), prior(context).log_prob(z))
    with pytest.raises(ValueError, match=r"context of shape \(\.\.\., 2\), got None"):
        prior()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\), got shape \(5,\)"):
        prior(torch.randn(5))
