"""PSIS k-hat separates good from bad guides; InferenceData carries the model's sites."""

from __future__ import annotations

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_arflow as af

PRIOR_SCALE, NOISE = 2.0, 1.0
DATA = torch.tensor([0.3, 1.1, 0.7, 1.9, 1.4])


def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SCALE))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu, NOISE), obs=data)


def gaussian_guide(loc: float, scale: float):
    def guide(data):
        pyro.sample("mu", dist.Normal(torch.tensor(loc), torch.tensor(scale)))

    return guide


def exact_posterior(data):
    precision = 1 / PRIOR_SCALE**2 + len(data) / NOISE**2
    return (data.sum() / NOISE**2 / precision).item(), precision**-0.5


def test_khat_is_small_for_the_exact_posterior_and_large_for_a_misplaced_guide():
    loc, scale = exact_posterior(DATA)
    good = af.psis_khat(model, gaussian_guide(loc, scale), DATA, num_particles=2000)
    slightly_wide = af.psis_khat(model, gaussian_guide(loc, 1.2 * scale), DATA, num_particles=2000)
    bad = af.psis_khat(
        model, gaussian_guide(loc + 3 * scale, 0.3 * scale), DATA, num_particles=2000
    )
    assert good < 0.2
    assert slightly_wide < 0.5  # a wider guide has bounded weights
    assert bad > 0.7


def test_khat_of_a_fitted_flow_guide():
    guide = af.AutoARFlow(model, hidden_dims=[8])
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(300):
        svi.step(DATA)
    assert af.psis_khat(model, guide, DATA, num_particles=2000) < 0.5


def plated_model(data):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    weights = pyro.sample("weights", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("groups", 3, dim=-2):
        offsets = pyro.sample("offsets", dist.Normal(0.0, 1.0))
        with pyro.plate("items", 4, dim=-1):
            pyro.sample(
                "obs", dist.Normal(offsets + weights.sum(-1, keepdim=True), scale), obs=data
            )


def test_inference_data_has_every_site_with_its_shape_and_plate_dims():
    data = torch.randn(3, 4)
    guide = af.AutoARFlow(plated_model, hidden_dims=[8])
    svi = SVI(plated_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        svi.step(data)
    idata = af.to_inference_data(plated_model, guide, data, num_samples=50)
    posterior = idata.posterior
    assert set(posterior.data_vars) == {"scale", "weights", "offsets"}
    assert posterior["scale"].shape == (1, 50)
    assert posterior["weights"].shape == (1, 50, 2)
    assert posterior["offsets"].shape == (1, 50, 3, 1)
    assert posterior["offsets"].dims == ("chain", "draw", "groups", "offsets_dim_1")
    assert posterior["weights"].dims == ("chain", "draw", "weights_dim_0")
    assert (posterior["scale"].values > 0).all()
    assert idata.observed_data["obs"].dims == ("groups", "items")
    assert (idata.observed_data["obs"].values == data.cpu().numpy()).all()
    summary = az.summary(idata, kind="stats")
    assert len(summary) == 1 + 2 + 3
    # the draws are the guide's: their mean matches the guide's own Monte Carlo quantiles
    median = guide.quantiles([0.5], data)["weights"][0]
    assert torch.allclose(
        torch.tensor(posterior["weights"].median(("chain", "draw")).values), median, atol=0.3
    )


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_particles must be an int >= 2, got 1"):
        af.psis_khat(model, gaussian_guide(0.0, 1.0), DATA, num_particles=1)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        af.to_inference_data(model, gaussian_guide(0.0, 1.0), DATA, num_samples=0)


def conjugate_pair(data):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=data)


def test_importance_resampling_recovers_the_exact_posterior_the_guide_misses():
    data = torch.tensor([[0.5, -1.0], [1.5, 0.2], [0.9, -0.4], [1.2, 0.0]])
    precision = 1 / 9 + len(data)
    mean, sd = data.sum(0) / precision, precision**-0.5

    def off_guide(data):  # 0.3 sd off-centre and 20% too narrow
        pyro.sample("loc", dist.Normal(mean + 0.3 * sd, 0.8 * sd).to_event(1))

    draws = af.importance_resample(
        conjugate_pair, off_guide, data, num_samples=20000, num_proposals=100000
    )
    loc = draws.samples["loc"]
    assert loc.shape == (20000, 2)
    assert ((loc.mean(0) - mean).abs() / sd).max() < 0.05
    assert ((loc.std(0) / sd).log().abs()).max() < 0.05
    assert draws.khat < 0.7 and 1000 < draws.ess < 100000
    assert torch.isclose(draws.log_weights.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
