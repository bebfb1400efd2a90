"""af.fit: it reaches an exact posterior, stops when flat, and reports divergence."""

from __future__ import annotations

import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_arflow as af
from conftest import DEVICE
from pyro_arflow import fitting
from pyro_arflow.fitting import elbo_slope_bound

DATA = torch.tensor([2.1, 1.4, 3.3, 2.8, 1.9, 2.5, 3.1, 2.2])


def conjugate_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def exact_posterior(data) -> tuple[float, float]:
    precision = 1 / 9 + len(data)
    return float(data.sum() / precision), precision**-0.5


def test_fit_stops_flat_and_lands_on_the_exact_posterior():
    guide = AutoNormal(conjugate_model)
    # 16 particles: with 4 the last parameters carry 0.03 sd of gradient noise (seed 0)
    result = af.fit(conjugate_model, guide, DATA, max_steps=6000, num_particles=16, progress=False)
    assert result.converged and result.status.startswith("converged (flat at")
    assert result.flat_at < 6000 and result.steps > result.flat_at  # the anneal followed
    mean, sd = exact_posterior(DATA)
    fitted_loc = pyro.param("AutoNormal.locs.loc").item()
    fitted_scale = pyro.param("AutoNormal.scales.loc").item()
    assert abs(fitted_loc - mean) < 0.03 * sd
    assert abs(math.log(fitted_scale / sd)) < 0.05
    assert len(result.elbo) == result.steps and result.seconds > 0


def test_fit_honours_the_step_cap():
    result = af.fit(
        conjugate_model, AutoNormal(conjugate_model), DATA, max_steps=40, progress=False
    )
    assert result.steps == 40 and result.status == "step cap" and not result.converged


def exploding_model():
    """Its log density overflows once the guide's scale grows: a model built to diverge."""
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("overflow", torch.exp(torch.exp(x.abs() * 5.0)))


def test_fit_reports_divergence_by_step_and_restores_finite_parameters():
    guide = AutoNormal(exploding_model, init_scale=1.0)
    with pytest.warns(RuntimeWarning, match="training diverged at step"):
        result = af.fit(exploding_model, guide, max_steps=500, progress=False)
    assert result.diverged and result.status == f"diverged (step {result.steps + 1})"
    for name, value in pyro.get_param_store().items():
        assert torch.isfinite(value).all(), name


@pytest.mark.parametrize(
    "costs, chosen, timed",
    [
        ({4: 1.0, 8: 1.1, 16: 1.5, 32: 1.9}, 32, [4, 8, 16, 32]),
        ({4: 1.0, 8: 1.2, 16: 1.9, 32: 3.0}, 16, [4, 8, 16, 32]),
        ({4: 1.0, 8: 2.5, 16: 5.0, 32: 10.0}, 4, [4, 8]),  # a costly model: 16, 32 never run
    ],
)
def test_auto_particles_take_the_most_that_cost_at_most_twice_the_fewest(
    monkeypatch, costs, chosen, timed
):
    calls = []

    def seconds(model, guide, args, kwargs, particles):
        calls.append(particles)
        return costs[particles]

    monkeypatch.setattr(fitting, "_gradient_seconds", seconds)
    assert fitting._affordable_particles(conjugate_model, None, (DATA,), {}) == chosen
    assert calls == timed


def test_auto_particles_train_as_the_same_count_given_by_hand():
    """Timing draws from the guide; the random state is put back, so a seeded fit is the
    same whether its count was chosen or given."""
    traces = []
    for particles in ("auto", None):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        count = particles if particles == "auto" else traces[0][1]
        result = af.fit(
            conjugate_model,
            AutoNormal(conjugate_model),
            DATA,
            max_steps=30,
            num_particles=count,
            progress=False,
        )
        traces.append((result.elbo, result.num_particles))
    assert traces[0] == traces[1]


def test_auto_particles_are_timed_without_leaving_gradients_and_reported():
    guide = AutoNormal(conjugate_model)
    result = af.fit(conjugate_model, guide, DATA, max_steps=5, progress=False)
    assert result.num_particles in fitting.PARTICLE_CHOICES
    guide(DATA)
    fitting._gradient_seconds(conjugate_model, guide, (DATA,), {}, 4)
    for name, value in pyro.get_param_store().named_parameters():
        assert value.grad is None or not value.grad.any(), name
    given = af.fit(conjugate_model, guide, DATA, max_steps=5, num_particles=3, progress=False)
    assert given.num_particles == 3
    renyi = pyro.infer.RenyiELBO(alpha=0.5, num_particles=2)
    assert (
        af.fit(conjugate_model, guide, DATA, max_steps=5, loss=renyi, progress=False).num_particles
        == 2
    )


def test_elbo_slope_bound_tells_climbing_from_flat():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, generator=generator, dtype=torch.float64)
    flat = noise.tolist()
    climbing = (noise + 0.002 * torch.arange(2000)).tolist()  # 2 nats per 1000 steps
    assert elbo_slope_bound(flat) < 0.25
    assert elbo_slope_bound(climbing) > 1.5
    assert elbo_slope_bound((0.3 * noise).tolist()) < elbo_slope_bound(flat)  # quieter: surer


@pytest.mark.parametrize(
    "option, value",
    [
        ("max_steps", 0),
        ("lr", -1.0),
        ("lr", math.nan),
        ("tolerance", 0.0),
        ("num_particles", 0),
        ("max_seconds", -5),
    ],
)
def test_bad_options_raise_value_errors(option, value):
    with pytest.raises(ValueError, match=option):
        af.fit(
            conjugate_model, AutoNormal(conjugate_model), DATA, progress=False, **{option: value}
        )


def test_smoothed_trace_averages_full_windows():
    result = af.FitResult(elbo=[1.0, 3.0, 5.0, 7.0, 9.0])
    assert result.smoothed(2) == ([2, 4], [2.0, 6.0])


def test_sticking_the_landing_follows_fits_schedule_and_the_guide_keeps_its_own():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2, device=DEVICE), 1.0).to_event(1))

    guide = af.AutoARFlow(model, hidden_dims=[8])
    seen = []

    class Spy(pyro.infer.Trace_ELBO):
        def loss(self, model, guide, *args, **kwargs):
            seen.append(guide.sticking_the_landing)
            return super().loss(model, guide, *args, **kwargs)

        def loss_and_grads(self, model, guide, *args, **kwargs):
            seen.append(guide.sticking_the_landing)
            return super().loss_and_grads(model, guide, *args, **kwargs)

    af.fit(model, guide, max_steps=50, loss=Spy(), sticking_the_landing="always", progress=False)
    assert seen and all(seen) and guide.sticking_the_landing is False
    with pytest.raises(ValueError, match="sticking_the_landing must be one of"):
        af.fit(model, guide, sticking_the_landing=True)
    with pytest.raises(ValueError, match="needs an AutoARFlow guide"):
        af.fit(model, AutoNormal(model), sticking_the_landing="always")


def correlated_model(correlation: float):
    covariance = torch.tensor([[1.0, correlation], [correlation, 1.0]], device=DEVICE)
    pyro.sample("x", dist.MultivariateNormal(torch.zeros(2, device=DEVICE), covariance))


CORRELATED = partial(correlated_model, 0.9)


def mean_field_fit(schedule: str) -> tuple[af.FitResult, torch.Tensor]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    result = af.fit(
        CORRELATED, AutoNormal(CORRELATED), mass_covering=schedule, num_particles=32, progress=False
    )
    assert result.converged
    return result, pyro.param("AutoNormal.scales.x").detach()


def test_the_renyi_bound_after_the_first_plateau_widens_a_mean_field_guide():
    """Mean field on a correlated Gaussian (rho = 0.9): the reverse KL's optimum has the
    conditional sds, sqrt(1 - rho^2) = 0.44; the Rényi bound of order 1/2 moves them toward the
    marginal sds (1), as it weighs each particle by the square root of its importance weight."""
    kl, kl_scales = mean_field_fit("never")
    assert kl.mass_covering_from is None
    conditional_sd = (1 - 0.9**2) ** 0.5
    torch.testing.assert_close(
        kl_scales, torch.full_like(kl_scales, conditional_sd), rtol=0.02, atol=0
    )
    renyi, renyi_scales = mean_field_fit("after the first plateau")
    assert 1000 < renyi.mass_covering_from < renyi.flat_at  # from the first plateau's end
    assert bool((renyi_scales > 1.15 * conditional_sd).all()), renyi_scales


def path_model():
    path = af.GaussianPath(lambda x, t: (x, 1.0), dist.Normal(0.0, 1.0), 4)
    pyro.sample("x", path)


def test_auto_takes_the_renyi_bound_for_guides_with_paths_only():
    with_paths = af.AutoARFlow(path_model)
    with_paths._setup_prototype()
    flat = af.AutoARFlow(path_model, paths="flat")
    flat._setup_prototype()
    schedule = fitting._mass_covering_schedule
    assert schedule(with_paths, "auto") == "after the first plateau"
    assert schedule(flat, "auto") == schedule(AutoNormal(path_model), "auto") == "never"
    assert schedule(flat, "after the first plateau") == "after the first plateau"
    given = af.fit(
        CORRELATED,
        AutoNormal(CORRELATED),
        loss=pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True),
        mass_covering="after the first plateau",
        progress=False,
    )
    assert given.converged and given.mass_covering_from is None  # a given loss throughout
    with pytest.raises(ValueError, match="mass_covering must be one of"):
        af.fit(CORRELATED, AutoNormal(CORRELATED), mass_covering="always")


class _FailingRenyi(pyro.infer.RenyiELBO):
    """A Rényi bound whose every step fails, as a diverging one does."""

    def loss_and_grads(self, model, guide, *args, **kwargs):
        raise ValueError("Expected parameter scale to satisfy the constraint GreaterThan")


def test_a_diverging_renyi_phase_goes_back_to_the_kl(monkeypatch):
    monkeypatch.setattr(fitting, "RenyiELBO", _FailingRenyi)
    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning, match="training goes on under the KL"):
        result = af.fit(
            CORRELATED,
            AutoNormal(CORRELATED),
            mass_covering="after the first plateau",
            num_particles=8,
            progress=False,
        )
    assert result.converged and not result.diverged
    assert result.mass_covering_until == result.mass_covering_from  # its first step failed
    assert all(math.isfinite(value) for value in result.elbo)
