"""AutoARFlow: exactness on a conjugate model, the funnel, every flow and ELBO, checkpoints."""

from __future__ import annotations

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
)
from pyro.infer.autoguide import AutoNormal, init_to_sample, init_to_value
from pyro.optim import Adam, ClippedAdam

import pyro_arflow as af


def fit(model, guide, steps, lr=0.01, final_lr_fraction=0.05, particles=16, *args):
    optimizer = ClippedAdam({"lr": lr, "lrd": final_lr_fraction ** (1 / steps)})
    svi = SVI(
        model, guide, optimizer, Trace_ELBO(num_particles=particles, vectorize_particles=True)
    )
    for _ in range(steps):
        svi.step(*args)


@torch.no_grad()
def elbo_estimate(model, guide, particles=5000, *args) -> float:
    return -Trace_ELBO(num_particles=particles, vectorize_particles=True).loss(model, guide, *args)


class ConjugateGaussian:
    """z ~ N(0, I_10), x | z ~ N(A z, 0.5^2 I): posterior and evidence in closed form."""

    def __init__(self, dim: int = 10, shared: float = 0.3, sigma: float = 0.5) -> None:
        g = torch.Generator().manual_seed(1)
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        a = a + shared * torch.randn(dim, 1, generator=g, dtype=torch.float64)  # correlation
        x = a @ torch.randn(dim, generator=g, dtype=torch.float64)
        x = x + sigma * torch.randn(dim, generator=g, dtype=torch.float64)
        precision = torch.eye(dim, dtype=torch.float64) + a.T @ a / sigma**2
        self.covariance = torch.linalg.inv(precision)
        self.mean = self.covariance @ a.T @ x / sigma**2
        marginal = a @ a.T + sigma**2 * torch.eye(dim, dtype=torch.float64)
        self.log_evidence = (
            dist.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), marginal)
            .log_prob(x)
            .item()
        )
        # the best fully factorized Gaussian misses KL = (sum log diag(P) - log det P) / 2
        self.mean_field_gap = 0.5 * (precision.diag().log().sum() - torch.logdet(precision)).item()
        self.a, self.x, self.sigma, self.dim = a.float(), x.float(), sigma, dim

    def __call__(self) -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros(self.dim), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ self.a.T, self.sigma).to_event(1), obs=self.x)


def test_conjugate_posterior_is_recovered_and_beats_mean_field():
    model = ConjugateGaussian()
    assert model.mean_field_gap > 1.0  # the posterior is correlated enough to matter
    guide = af.AutoARFlow(model, hidden_dims=[64])
    fit(model, guide, steps=2000)
    flow_gap = model.log_evidence - elbo_estimate(model, guide)
    assert flow_gap < 0.1
    with torch.no_grad():
        samples = guide.get_posterior().sample((20000,)).double()
    assert (samples.mean(0) - model.mean).abs().max() < 0.05
    assert (torch.cov(samples.T) - model.covariance).abs().max() < 0.05

    pyro.clear_param_store()
    mean_field = AutoNormal(model)
    fit(model, mean_field, steps=1000)
    normal_gap = model.log_evidence - elbo_estimate(model, mean_field)
    print(
        f"conjugate ELBO gap to log evidence: AutoARFlow {flow_gap:.3f}, AutoNormal "
        f"{normal_gap:.3f} (closed-form mean-field bound {model.mean_field_gap:.3f})"
    )
    assert normal_gap > 0.9 * model.mean_field_gap  # it cannot beat the closed-form bound
    assert normal_gap > flow_gap + 1.0


def funnel():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), torch.exp(v / 2).unsqueeze(-1)).to_event(1))


def test_funnel_flow_beats_mean_field():
    guide = af.AutoARFlow(funnel, num_flows=3, hidden_dims=[32])
    fit(funnel, guide, steps=1000, particles=8)
    flow_elbo = elbo_estimate(funnel, guide)
    pyro.clear_param_store()
    mean_field = AutoNormal(funnel)
    fit(funnel, mean_field, steps=1000, particles=8)
    normal_elbo = elbo_estimate(funnel, mean_field)
    print(f"funnel ELBO: AutoARFlow {flow_elbo:.3f}, AutoNormal {normal_elbo:.3f}")
    assert flow_elbo > normal_elbo + 0.1


def shapes_model(data: torch.Tensor | None = None):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    weights = pyro.sample("weights", dist.Normal(0.0, 1.0).expand([2, 2]).to_event(2))
    with pyro.plate("groups", 3):
        locs = pyro.sample("locs", dist.Normal(weights.sum((-1, -2)).unsqueeze(-1), 1.0))
        return pyro.sample("obs", dist.Normal(locs, scale), obs=data)


SITE_SHAPES = {"scale": (), "weights": (2, 2), "locs": (3,)}


@pytest.mark.parametrize("elbo_class", [Trace_ELBO, JitTrace_ELBO])
@pytest.mark.parametrize("flow", ["iaf", "maf", "iaf-lstm", "maf-lstm"])
def test_every_builtin_flow_trains_and_summarizes(flow, elbo_class):
    data = torch.tensor([1.0, -0.5, 2.0])
    kwargs = {"hidden_size": 8} if flow.endswith("lstm") else {"hidden_dims": [16]}
    guide = af.AutoARFlow(shapes_model, flow=flow, **kwargs)
    elbo = elbo_class(ignore_jit_warnings=True) if elbo_class is JitTrace_ELBO else elbo_class()
    svi = SVI(shapes_model, guide, Adam({"lr": 0.01}), elbo)
    losses = [svi.step(data) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    flow_params = [p for name, p in guide.named_parameters() if name.startswith("flow.")]
    assert flow_params and any(p.abs().sum() > 0 for p in flow_params)
    median = guide.median(data)
    assert {k: tuple(v.shape) for k, v in median.items()} == SITE_SHAPES
    assert median["scale"] > 0
    quantiles = guide.quantiles([0.1, 0.5, 0.9], data)
    for name, shape in SITE_SHAPES.items():
        assert quantiles[name].shape == (3,) + shape
        assert torch.all(quantiles[name][0] <= quantiles[name][1])
        assert torch.all(quantiles[name][1] <= quantiles[name][2])
    samples = Predictive(shapes_model, guide=guide, num_samples=7)(None)
    reference = Predictive(shapes_model, guide=AutoNormal(shapes_model), num_samples=7)(None)
    assert {k: v.shape for k, v in samples.items()} == {k: v.shape for k, v in reference.items()}
    for name, shape in SITE_SHAPES.items():  # Pyro pads unplated sites to the plate depth
        assert samples[name].shape[0] == 7 and samples[name].shape[-len(shape) or 1 :] == (
            shape or (1,)
        )


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        TraceGraph_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=4),
    ],
    ids=["vectorized-trace", "tracegraph", "renyi"],
)
def test_other_elbos(elbo):
    guide = af.AutoARFlow(shapes_model, hidden_dims=[16])
    svi = SVI(shapes_model, guide, Adam({"lr": 0.01}), elbo)
    losses = [svi.step(torch.tensor([1.0, -0.5, 2.0])) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("flow", ["iaf", "iaf-lstm"])
def test_iaf_guides_never_run_the_sequential_direction(flow):
    """Scoring the guide's own sample must reuse the sampling pass, not invert the IAF."""
    data = torch.tensor([1.0, -0.5, 2.0])
    guide = af.AutoARFlow(shapes_model, flow=flow)
    svi = SVI(shapes_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(data)
    solves = []
    for module in guide.flow.modules():
        if isinstance(module, af.IAF):
            original = module.conditioner.recur
            module.conditioner.recur = lambda *a, _f=original, **k: solves.append(1) or _f(*a, **k)
    svi.step(data)
    Predictive(shapes_model, guide=guide, num_samples=3)(data)
    assert solves == []


def test_step_zero_equals_autonormal_started_at_the_same_point():
    data = torch.tensor([1.0, -0.5, 2.0])
    guide = af.AutoARFlow(
        shapes_model, hidden_dims=[16], init_loc_fn=init_to_sample, init_scale=0.2
    )
    guide(data)
    init_loc = guide._init_loc()
    posterior = guide.get_posterior()
    latent = init_loc + 0.3 * torch.randn(5, guide.latent_dim)
    expected = dist.Normal(init_loc, 0.2).to_event(1).log_prob(latent)
    torch.testing.assert_close(posterior.log_prob(latent), expected, atol=1e-5, rtol=0)
    constrained = dict(guide._constrain(init_loc))
    for name, value in guide.median(data).items():
        torch.testing.assert_close(value, constrained[name], atol=1e-6, rtol=0)


def test_init_to_value_tensors_are_copied_not_trained_in_place():
    data = torch.tensor([1.0, -0.5, 2.0])
    start = torch.tensor([0.5, 0.5, 0.5])
    guide = af.AutoARFlow(
        shapes_model, hidden_dims=[8], init_loc_fn=init_to_value(values={"locs": start})
    )
    svi = SVI(shapes_model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(5):
        svi.step(data)
    assert torch.equal(start, torch.tensor([0.5, 0.5, 0.5]))
    assert not torch.allclose(guide.median(data)["locs"], start)  # the guide itself did move


def test_checkpoints_round_trip(tmp_path):
    data = torch.tensor([1.0, -0.5, 2.0])
    guide = af.AutoARFlow(shapes_model, flow="iaf-lstm", hidden_size=8)
    svi = SVI(shapes_model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        svi.step(data)

    def draws(g):
        pyro.set_rng_seed(7)
        return Predictive(shapes_model, guide=g, num_samples=5)(data)

    expected = draws(guide)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    for name, value in draws(reloaded).items():
        assert torch.equal(value, expected[name]), name

    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    fresh = af.AutoARFlow(shapes_model, flow="iaf-lstm", hidden_size=8)
    fresh(data)  # builds the flow, then the store's values replace the fresh ones
    pyro.get_param_store().load(tmp_path / "params.pt")
    for name, value in draws(fresh).items():
        assert torch.equal(value, expected[name]), name


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown flow 'realnvp'.*'iaf'"):
        af.AutoARFlow(shapes_model, flow="realnvp")
    with pytest.raises(ValueError, match="init_scale must be a number > 0, got -1"):
        af.AutoARFlow(shapes_model, init_scale=-1.0)
    with pytest.raises(ValueError, match="num_flows"):
        af.AutoARFlow(shapes_model, num_flows=0)
    guide = af.AutoARFlow(shapes_model)
    with pytest.raises(ValueError, match=r"quantiles must lie in \(0, 1\)"):
        guide.quantiles([0.5, 1.5], torch.zeros(3))
