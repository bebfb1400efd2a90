"""FlowPrior: its density is the flow's, it trains inside a model, it round-trips."""

from __future__ import annotations

import copy
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
from pyro.optim import Adam

import pyro_arflow as af
from conftest import perturb


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
    prior = perturb(af.FlowPrior(3, context_dim=2, hidden_dims=[8], orderings="random", seed=4))
    clone = af.FlowPrior(3, context_dim=2, hidden_dims=[8], orderings="random", seed=5)
    clone.load_state_dict(prior.state_dict())
    context, z = torch.randn(2), torch.randn(3)
    assert torch.equal(clone(context).log_prob(z), prior(context).log_prob(z))
    with pytest.raises(ValueError, match=r"context of shape \(\.\.\., 2\), got None"):
        prior()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\), got shape \(5,\)"):
        prior(torch.randn(5))


def standard_normal_log_prob(z):
    return dist.Normal(torch.zeros_like(z), 1.0).to_event(1).log_prob(z)


def test_two_priors_in_one_model_are_independent_by_default():
    first = perturb(af.FlowPrior(4, hidden_dims=[8]))
    second = af.FlowPrior(4, hidden_dims=[8])  # untrained: the identity flow
    other_size = af.FlowPrior(6, hidden_dims=[8])
    z, w = torch.randn(4), torch.randn(6)

    def model():
        pyro.sample("a", first())
        pyro.sample("b", second())
        pyro.sample("c", other_size())

    pyro.poutine.trace(model).get_trace()
    torch.testing.assert_close(second().log_prob(z), standard_normal_log_prob(z))
    torch.testing.assert_close(other_size().log_prob(w), standard_normal_log_prob(w))
    assert not torch.allclose(first().log_prob(z), standard_normal_log_prob(z))
    store = pyro.get_param_store()
    parameters = len(list(first.flow.parameters()))
    assert len(store) == 3 * parameters  # three priors, three sets of parameters


def test_priors_share_parameters_exactly_when_named_alike():
    original = perturb(af.FlowPrior(4, hidden_dims=[8], name="shared"))
    original()
    twin = af.FlowPrior(4, hidden_dims=[8], name="shared")
    z = torch.randn(4)
    assert torch.equal(twin().log_prob(z), original().log_prob(z))
    assert all(
        a is b for a, b in zip(twin.flow.parameters(), original.flow.parameters(), strict=True)
    )
    af.FlowPrior(5, hidden_dims=[8], name="shared-5")()
    clash = af.FlowPrior(4, hidden_dims=[8], name="shared-5")
    with pytest.raises(ValueError, match=r"'shared-5.flow\$\$\$0.conditioner.*shape.*own name"):
        clash()
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        af.FlowPrior(4, name="")


def test_a_prior_inside_a_pyro_module_is_named_by_its_path():
    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.prior = af.FlowPrior(3, hidden_dims=[4])

    model = Model()
    model.prior()
    names = list(pyro.get_param_store().keys())
    assert names and all(name.startswith("prior.flow$$$") for name in names)


def test_deepcopy_and_pickle_of_a_used_prior():
    prior = perturb(af.FlowPrior(3, context_dim=2, hidden_dims=[8]))
    context, z = torch.randn(2), torch.randn(3)
    expected = prior(context).log_prob(z)
    expected.backward()
    for other in (copy.deepcopy(prior), pickle.loads(pickle.dumps(prior))):
        assert torch.equal(other(context).log_prob(z), expected)
