"""Prior-structured AutoARFlow: it starts as the prior, is a flow, trains, and is exact where it
can be."""

from __future__ import annotations

import pickle
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from torch.distributions import biject_to, constraints

import pyro_arflow as af
from conftest import perturb
from pyro_arflow.structured import StructuredTransform

pytestmark = pytest.mark.usefixtures("float64")


T = 5
DATA = torch.tensor([0.3, -0.2, 0.8, 1.1, 0.4])


def ar1_step(persistence, shock, x, t):
    return persistence * x, shock


def ar1_model(data):
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    shock = pyro.sample("shock", dist.HalfNormal(1.0))
    path = af.GaussianPath(
        partial(ar1_step, persistence, shock),  # picklable, unlike a lambda
        dist.Normal(0.0, shock / (1 - persistence**2).sqrt()),
        len(data),
    )
    x = pyro.sample("x", path)
    pyro.sample("y", dist.Normal(x, 0.5).to_event(1), obs=data)


def prior_at(globals_: dict, data) -> af.GaussianPath:
    trace = poutine.trace(poutine.condition(ar1_model, globals_)).get_trace(data)
    return trace.nodes["x"]["fn"]


def globals_density(guide, theta):
    """log q(theta) of the guide's globals' flow, on the unconstrained globals."""
    base = dist.Normal(torch.zeros_like(theta), 1.0).to_event(1)
    return dist.TransformedDistribution(base, guide._globals_parts()).log_prob(theta)


def test_at_initialization_the_path_given_the_globals_is_the_prior():
    guide = af.AutoARFlow(ar1_model, hidden_dims=[8])
    guide(DATA)
    posterior = guide.get_posterior(DATA)
    latent = posterior.sample((6,))  # columns: persistence, shock (unconstrained), x
    latent = latent + torch.randn_like(latent)  # anywhere, not only the guide's draws
    theta = latent[:, :2]
    persistence = biject_to(constraints.interval(-1.0, 1.0))(theta[:, 0])
    shock = biject_to(constraints.positive)(theta[:, 1])
    path_density = posterior.log_prob(latent) - globals_density(guide, theta)
    prior = prior_at({"persistence": persistence, "shock": shock}, DATA)
    assert torch.allclose(path_density, prior.log_prob(latent[:, 2:]), atol=1e-10)


@pytest.mark.parametrize(
    "model_name, steps",
    [("ar1_model", T), ("ar1_model", 80), ("lorenz_like", 6)],  # 80 states: drawn by Newton
)
def test_it_is_a_flow_inverse_and_log_det_against_autograd(model_name, steps):
    """Scalar states (a mix per step) and vector ones (a mix matrix and a within-step
    mixing per step), every part of the guide moved away from zero; short paths drawn step
    by step, long ones by Newton's method over the whole path."""
    model = globals()[model_name]
    data = torch.linspace(-1, 1, steps)
    guide = af.AutoARFlow(model, hidden_dims=[8])
    guide(data)
    perturb(guide, std=0.2)
    transform = guide.get_transform(data)
    assert transform.model is model  # as written: no initialization messenger drawing paths
    z = torch.randn(guide.latent_dim)
    latent = transform(z)
    fresh = guide.get_transform(data)  # no cache: the inverse is computed (one pass per path)
    assert isinstance(fresh, StructuredTransform)
    assert torch.allclose(fresh.inv(latent), z, atol=1e-9)
    jacobian = torch.autograd.functional.jacobian(guide.get_transform(data), z)
    expected = jacobian.slogdet()[1]
    assert torch.allclose(transform.log_abs_det_jacobian(z, latent), expected, atol=1e-9)
    assert torch.allclose(fresh.log_abs_det_jacobian(z, latent), expected, atol=1e-9)


def test_gradients_reach_the_residual_its_network_and_the_globals_flow():
    guide = af.AutoARFlow(ar1_model, hidden_dims=[8])
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True).differentiable_loss(
        ar1_model, guide, DATA
    )
    loss.backward()
    gradients = {name: p.grad for name, p in guide.named_parameters()}
    reached = [
        name for name, grad in gradients.items() if grad is not None and grad.abs().sum() > 0
    ]
    for part in ("paths.0.shift", "paths.0.mix", "paths.0.log_scale", "paths.0.context_net.2"):
        assert any(name.startswith(part) for name in reached), part
    assert any(name.startswith("flow.") for name in reached)
    assert "loc_unconstrained" in reached and "scale_unconstrained" in reached


LEVEL_SD, NOISE_SD = 0.5, 1.0
WALK = torch.tensor([0.2, 0.9, 1.1, 0.4, -0.3, -0.2, 0.6, 1.5, 1.2, 0.8, 1.7, 2.2, 1.4, 1.0, 1.9])


def local_level(data):
    walk = af.GaussianPath(lambda x, t: (x, LEVEL_SD), dist.Normal(0.0, 1.0), len(data))
    level = pyro.sample("level", walk)
    pyro.sample("y", dist.Normal(level, NOISE_SD).to_event(1), obs=data)


def exact_local_level(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and sd of the level by dense Gaussian conditioning."""
    n = len(data)
    steps = torch.tensor([1.0] + [LEVEL_SD**2] * (n - 1), dtype=torch.float64)
    prior = torch.tril(torch.ones(n, n, dtype=torch.float64)) @ torch.diag(steps)
    prior = prior @ torch.tril(torch.ones(n, n, dtype=torch.float64)).T
    gain = prior @ torch.linalg.inv(prior + NOISE_SD**2 * torch.eye(n, dtype=torch.float64))
    mean = gain @ data.double()
    covariance = prior - gain @ prior
    return mean, covariance.diagonal().sqrt()


def test_fit_reaches_the_exact_posterior_of_a_linear_gaussian_path():
    """Given the globals (here none) the family holds this posterior exactly: Gaussian
    conditionals with means linear in the previous state."""
    guide = af.AutoARFlow(local_level)
    result = af.fit(local_level, guide, WALK, max_steps=6000, progress=False)
    assert result.converged
    predictive = Predictive(
        local_level, guide=guide, num_samples=20000, parallel=True, return_sites=["level"]
    )
    draws = predictive(WALK)
    mean, sd = exact_local_level(WALK)
    error = (draws["level"].mean(0) - mean).abs() / sd
    log_sd_error = (draws["level"].std(0) / sd).log().abs()
    assert error.mean() < 0.05 and error.max() < 0.1
    assert log_sd_error.mean() < 0.05 and log_sd_error.max() < 0.1


def lorenz_like(data):
    """Vector states (3) whose noise scale is a global, as in a nonlinear state-space model."""
    noise = pyro.sample("noise", dist.HalfNormal(1.0))

    def transition(x, t):
        return x + 0.05 * torch.stack([x[..., 1], -x[..., 0], -x[..., 2]], -1), noise[..., None]

    start = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    path = pyro.sample("path", af.GaussianPath(transition, start, 6))
    pyro.sample("y", dist.Normal(path[..., 0], 0.3).to_event(1), obs=data)


def test_vector_states_draw_score_and_summarize():
    data = torch.linspace(-1, 1, 6)
    guide = af.AutoARFlow(lorenz_like, hidden_dims=[4])
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True).loss(lorenz_like, guide, data)
    assert torch.isfinite(torch.tensor(loss))
    assert guide.median(data)["path"].shape == (6, 3)
    assert guide.quantiles([0.1, 0.9], data)["path"].shape == (2, 6, 3)
    draws = Predictive(lorenz_like, guide=guide, num_samples=7, parallel=True)(data)
    assert draws["path"].shape == (7, 6, 3)


def test_flat_paths_put_every_latent_in_the_flow():
    flat = af.AutoARFlow(ar1_model, paths="flat", hidden_dims=[16])
    flat(DATA)
    assert flat.global_dim == 2 + T and not hasattr(flat, "paths")
    pyro.clear_param_store()
    structured = af.AutoARFlow(ar1_model, hidden_dims=[16])
    structured(DATA)
    assert structured.global_dim == 2 and len(structured.paths) == 1


@pytest.mark.parametrize("paths", ["prior", "laplace"])
def test_pickle_and_state_dict_round_trips_keep_the_guide(paths):
    guide = af.AutoARFlow(ar1_model, paths=paths, hidden_dims=[8])
    guide(DATA)
    perturb(guide, std=0.1)
    copy = pickle.loads(pickle.dumps(guide))
    for name, value in guide.median(DATA).items():
        assert torch.allclose(copy.median(DATA)[name], value), name
    pyro.clear_param_store()
    fresh = af.AutoARFlow(ar1_model, paths=paths, hidden_dims=[8])
    fresh(DATA)
    fresh.load_state_dict(guide.state_dict())
    latent = torch.randn(3, guide.latent_dim, dtype=torch.float64)
    expected = guide.get_posterior(DATA).log_prob(latent)
    assert torch.allclose(fresh.get_posterior(DATA).log_prob(latent), expected)


def test_neutra_preconditions_with_the_structured_guide():
    guide = af.AutoARFlow(ar1_model, hidden_dims=[8])
    guide(DATA)
    guide.requires_grad_(False)
    neutra = NeuTraReparam(guide)
    trace = poutine.trace(poutine.reparam(ar1_model, config=lambda _: neutra)).get_trace(DATA)
    assert torch.isfinite(trace.log_prob_sum())
    latent = torch.zeros(3, 2 + T, dtype=torch.float64)
    assert neutra.transform_sample(latent)["x"].shape == (3, T)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_path_options_raise(value):
    with pytest.raises(ValueError, match="path_hidden_dim"):
        af.AutoARFlow(ar1_model, path_hidden_dim=value)
    with pytest.raises(ValueError, match="paths must be"):
        af.AutoARFlow(ar1_model, paths="flow")


def observed_in_a_plate(data):
    """A path outside any plate, its observations in one (max_plate_nesting = 1)."""
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    level = pyro.sample("level", af.GaussianPath(lambda x, t: (x, scale), dist.Normal(0.0, 1.0), 6))
    with pyro.plate("time", 6):
        pyro.sample("y", dist.Normal(level, 0.5), obs=data)


def test_a_path_beside_a_plate_trains_and_summarizes():
    data = torch.linspace(0, 1, 6)
    guide = af.AutoARFlow(observed_in_a_plate, hidden_dims=[4])
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True).loss(
        observed_in_a_plate, guide, data
    )
    assert torch.isfinite(torch.tensor(loss))
    assert guide.quantiles([0.5], data)["level"].shape == (1, 6)
    # Predictive sized its particle plate from the guide, which shows no plate: the guide's
    # model run stops before the observations' plate, which would otherwise collide with it
    draws = Predictive(observed_in_a_plate, guide=guide, num_samples=5, parallel=True)(data)
    assert draws["level"].shape == (5, 1, 6)  # Pyro's layout with one plate, as AutoNormal's


def paths_in_a_plate(data):
    with pyro.plate("series", 3):
        start = pyro.sample("start", dist.Normal(0.0, 5.0))
        path = af.GaussianPath(lambda x, t: (x, 1.0), dist.Normal(start, 1.0), 4)
        level = pyro.sample("level", path)
        pyro.sample("y", dist.Normal(level, 0.5).to_event(1), obs=data)


def test_paths_in_a_plate_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="'level' lies in the plate 'series'.*paths='flat'"):
        af.AutoARFlow(paths_in_a_plate)(torch.zeros(3, 4))
    assert af.AutoARFlow(paths_in_a_plate, paths="flat", hidden_dims=[16])(torch.zeros(3, 4))
