"""NeuTra (Hoffman et al. 2019): a trained AutoARFlow preconditions NUTS through Pyro's own
``NeuTraReparam``, and the samples stay exact whatever the guide's quality."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from pyro.optim import ClippedAdam

import pyro_arflow as af
from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="MCMC runs on the CPU")

DESIGN = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
OBSERVED = torch.tensor([0.5, -1.0, 2.0, 1.5])
PRIOR_SCALE, NOISE = 2.0, 0.5


def conjugate_model() -> None:
    x = pyro.sample("x", dist.Normal(torch.zeros(3), PRIOR_SCALE).to_event(1))
    pyro.sample("y", dist.Normal(x @ DESIGN.T, NOISE).to_event(1), obs=OBSERVED)


def exact_posterior() -> tuple[torch.Tensor, torch.Tensor]:
    precision = torch.eye(3) / PRIOR_SCALE**2 + DESIGN.T @ DESIGN / NOISE**2
    covariance = torch.linalg.inv(precision)
    return covariance @ DESIGN.T @ OBSERVED / NOISE**2, covariance


def funnel() -> None:
    """Neal's funnel: y ~ N(0, 3), nine x_i ~ N(0, exp(y / 2))."""
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), torch.exp(y / 2).unsqueeze(-1)).to_event(1))


def trained_guide(model, steps: int, **guide_kwargs) -> af.AutoARFlow:
    guide = af.AutoARFlow(model, **guide_kwargs)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(model, guide, ClippedAdam({"lr": 0.01, "clip_norm": 10.0}), elbo)
    for _ in range(steps):
        svi.step()
    return guide.requires_grad_(False)  # NUTS needs gradients in the latent only


def nuts_draws(model, warmup: int, draws: int, seed: int = 0) -> dict[str, torch.Tensor]:
    pyro.set_rng_seed(seed)
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    mcmc.run()
    return mcmc.get_samples()


def neutra_draws(guide: af.AutoARFlow, model, warmup: int, draws: int) -> dict[str, torch.Tensor]:
    """NUTS on the guide's base space, the draws mapped back to the model's sites."""
    neutra = NeuTraReparam(guide)
    samples = nuts_draws(poutine.reparam(model, config=lambda _: neutra), warmup, draws)
    (latent,) = samples.values()  # the one shared latent site
    return neutra.transform_sample(latent)


@pytest.mark.parametrize("flow", ["iaf", "iaf-lstm"])
def test_neutra_nuts_matches_the_exact_posterior_of_a_conjugate_gaussian(flow):
    kwargs = {"hidden_dims": [16]} if flow == "iaf" else {"hidden_size": 8}
    guide = trained_guide(conjugate_model, 200, flow=flow, **kwargs)
    x = neutra_draws(guide, conjugate_model, warmup=300, draws=1500)["x"]
    mean, covariance = exact_posterior()
    sd = covariance.diagonal().sqrt()
    assert ((x.mean(0) - mean).abs() / sd).max() < 0.15
    correlation_scale = sd[:, None] * sd[None, :]
    assert ((torch.cov(x.T) - covariance).abs() / correlation_scale).max() < 0.15


def test_neutra_reaches_the_funnels_neck_that_plain_nuts_misses():
    """In 300 draws plain NUTS stays out of the neck (it reports no divergence, so only the
    draws tell): under N(0, 3), 15.9% of y lies below -3. A trained flow straightens the
    funnel and NUTS then explores there."""
    plain = nuts_draws(funnel, warmup=300, draws=300)["y"]
    guide = trained_guide(funnel, 3000, flow="iaf", hidden_dims=[32])
    neutra = neutra_draws(guide, funnel, warmup=300, draws=300)["y"]
    assert plain.min() > -3.5 and (plain < -3).float().mean() < 0.05
    assert neutra.min() < -4.5 and (neutra < -3).float().mean() > 0.08


def test_a_frozen_guide_runs_without_param_store_warnings():
    guide = trained_guide(funnel, 5, flow="iaf", hidden_dims=[16])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pyro warns of every frozen parameter it is given
        guide()
        neutra = NeuTraReparam(guide)
        poutine.trace(poutine.reparam(funnel, config=lambda _: neutra)).get_trace()
        draws = neutra.transform_sample(torch.zeros(4, 10))
    assert draws["x"].shape == (4, 9)
