"""No silent wrong answers on common Pyro models: each case failed quietly before it was fixed."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.optim import Adam

import pyro_arflow as af
from pyro_arflow import guides

COUNTS = torch.tensor([10.0, 30.0, 60.0])


def dirichlet_multinomial():
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    pyro.sample("c", dist.Multinomial(100, p), obs=COUNTS)


def test_quantiles_of_a_simplex_are_those_of_the_constrained_draws():
    guide = af.AutoARFlow(dirichlet_multinomial, hidden_dims=[8], init_scale=0.5)
    levels = [0.05, 0.5, 0.95]
    quantiles = guide.quantiles(levels, num_samples=20000)["p"]
    assert (quantiles[1:] > quantiles[:-1]).all()  # increasing in the level, every coordinate
    draws = Predictive(dirichlet_multinomial, guide=guide, num_samples=20000, parallel=True)()["p"]
    expected = torch.quantile(draws, torch.tensor(levels), dim=0)
    assert torch.allclose(quantiles, expected, atol=0.01)


def local_latents(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("n", len(data), subsample_size=5) as index:
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("y", dist.Normal(z, 0.1), obs=data[index])


def test_local_latents_in_a_subsampled_plate_are_refused_with_the_way_out():
    guide = af.AutoARFlow(local_latents, hidden_dims=[8])
    with pytest.raises(ValueError, match="'z' lies in the plate 'n'.*AutoNormal"):
        guide(torch.arange(20.0))


def subsampled_globals(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("n", len(data), subsample_size=5) as index:
        pyro.sample("y", dist.Normal(loc, 1.0), obs=data[index])


@pytest.mark.parametrize("name", ["psis_khat", "to_inference_data", "importance_resample"])
def test_diagnostics_refuse_a_minibatch(name):
    diagnostic = getattr(af, name)
    data = torch.arange(20.0)
    guide = af.AutoARFlow(subsampled_globals, hidden_dims=[8])
    guide(data)  # globals only: the guide itself is fine with subsampling
    with pytest.raises(ValueError, match="plate 'n' draws a subsample of 5 of its 20"):
        diagnostic(subsampled_globals, guide, data)


def vector_model(size: int):
    pyro.sample("x", dist.Normal(torch.zeros(size), 1.0).to_event(1))


def test_a_large_flow_warns_with_its_cost_and_the_options(monkeypatch):
    monkeypatch.setattr(guides, "LARGE_FLOW_MB", 0.01)
    guide = af.AutoARFlow(vector_model, hidden_dims=[64])
    with pytest.warns(UserWarning, match=r"holds \d+M parameters \(\d+ MB.*GaussianPath"):
        guide(40)


@pytest.mark.parametrize("flow", ["maf", "maf-lstm"])
def test_a_guide_that_samples_sequentially_warns(flow):
    with pytest.warns(UserWarning, match="samples by a sequential solve"):
        af.AutoARFlow(vector_model, flow=flow)


def test_iaf_guides_build_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for flow in ("iaf", "iaf-lstm"):
            af.AutoARFlow(vector_model, flow=flow)


@pytest.mark.parametrize("name, suggestion", [("IAF", "iaf"), ("iaf_lstm", "iaf-lstm")])
def test_misspelt_flow_names_get_a_suggestion(name, suggestion):
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        af.AutoARFlow(vector_model, flow=name)


@pytest.mark.parametrize("init_scale", [1e-12, 1e6])
def test_init_scale_outside_the_range_that_trains_warns(init_scale):
    with pytest.warns(UserWarning, match=r"outside \(0.001, 10.0\)"):
        af.AutoARFlow(vector_model, init_scale=init_scale)


def test_a_seed_gives_the_same_draws_whether_or_not_the_guide_was_set_up():
    """As after ParamStore.load in a fresh process: a guide not yet set up must draw what the
    trained one draws under the same seed."""
    trained = af.AutoARFlow(vector_model, hidden_dims=[8])
    trained(3)
    state = pyro.get_param_store().get_state()
    pyro.set_rng_seed(123)
    expected = trained(3)["x"]
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    restored = af.AutoARFlow(vector_model, hidden_dims=[8])
    pyro.set_rng_seed(123)
    assert torch.equal(restored(3)["x"], expected)


def test_a_latent_size_that_changes_raises_the_same_error_everywhere():
    guide = af.AutoARFlow(vector_model, hidden_dims=[8])
    svi = SVI(vector_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(3)
    message = "latent site 'x' has shape \\(5,\\), but this guide was built for shape \\(3,\\)"
    for call in (
        lambda: guide(5),
        lambda: guide.median(5),
        lambda: svi.step(5),
        lambda: Predictive(vector_model, guide=guide, num_samples=2)(5),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert guide(3)["x"].shape == (3,)  # the right size still works
