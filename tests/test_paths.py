"""GaussianPath: its density against closed forms, its flow form, its errors."""

from __future__ import annotations

import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide.initialization import init_to_sample

import pyro_arflow as af
from pyro_arflow.paths import PathCorrection, PathFlow

T = 7
DOUBLE = torch.float64


def ar1(phi: float = 0.8, sigma: float = 0.5, steps: int = T) -> af.GaussianPath:
    stationary = sigma / (1 - phi**2) ** 0.5
    return af.GaussianPath(
        lambda x, t: (phi * x, torch.full_like(x, sigma)),
        dist.Normal(torch.tensor(0.0, dtype=torch.float64), stationary),
        steps,
    )


def ar1_covariance(phi: float = 0.8, sigma: float = 0.5, steps: int = T) -> torch.Tensor:
    lag = torch.arange(steps, dtype=torch.float64)
    return sigma**2 / (1 - phi**2) * phi ** (lag[:, None] - lag[None, :]).abs()


def coupled_path(batch: tuple[int, ...] = ()) -> tuple[af.GaussianPath, torch.Tensor]:
    """A 2-dimensional linear path x_t = A x_{t-1} + t * c + diag(s) z with batched scales."""
    generator = torch.Generator().manual_seed(3)
    a = 0.5 * torch.randn(2, 2, generator=generator, dtype=torch.float64)
    scale = 0.2 + torch.rand(batch + (2,), generator=generator, dtype=torch.float64)

    def transition(x, t):
        return x @ a.T + 0.1 * t, scale

    initial = dist.Normal(torch.tensor([1.0, -1.0], dtype=torch.float64), 0.7).to_event(1)
    return af.GaussianPath(transition, initial, 5), scale


def test_ar1_log_prob_is_the_stationary_multivariate_normal():
    path = ar1()
    x = torch.randn(4, T, dtype=torch.float64)
    exact = dist.MultivariateNormal(torch.zeros(T, dtype=torch.float64), ar1_covariance())
    assert torch.allclose(path.log_prob(x), exact.log_prob(x), atol=1e-10)


def test_linear_vector_path_log_prob_is_the_gaussian_of_its_linear_map():
    """x = c + J z is linear in the noise: the density is N(c, J J^T) on the (T*k)-vector."""
    path, _ = coupled_path()
    flow = PathFlow(path)
    zeros = torch.zeros(5, 2, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(flow, zeros).reshape(10, 10)
    center = flow(zeros).reshape(10)
    exact = dist.MultivariateNormal(center, jacobian @ jacobian.T)
    x = path.sample((3,))
    assert x.shape == (3, 5, 2)
    assert torch.allclose(path.log_prob(x), exact.log_prob(x.reshape(3, 10)), atol=1e-9)


def test_flow_inverts_and_its_log_det_is_the_autograd_jacobians():
    path, _ = coupled_path()
    flow = PathFlow(path, cache_size=0)
    z = torch.randn(5, 2, dtype=torch.float64)
    x = flow(z)
    assert torch.allclose(flow.inv(x), z, atol=1e-10)
    jacobian = torch.autograd.functional.jacobian(flow, z).reshape(10, 10)
    assert torch.allclose(flow.log_abs_det_jacobian(z, x), jacobian.slogdet()[1], atol=1e-10)
    # block lower triangular in time: a state never reads later noise
    blocks = jacobian.reshape(5, 2, 5, 2).permute(0, 2, 1, 3)
    assert all(blocks[i, j].abs().max() == 0 for i in range(5) for j in range(i + 1, 5))


def test_rsample_log_prob_and_flow_form_agree_with_batched_globals():
    path, scale = coupled_path(batch=(3,))
    assert path.batch_shape == (3,) and path.event_shape == (5, 2)
    x = path.rsample((4,))
    assert x.shape == (4, 3, 5, 2)
    assert torch.allclose(path.log_prob(x), path.as_flow().log_prob(x), atol=1e-10)
    # the draw's noise is standard normal under the flow: its scores match the base's
    z = PathFlow(path).inv(x)
    expected = dist.Normal(0.0, 1.0).log_prob(z).sum((-2, -1)) - PathFlow(
        path
    ).log_abs_det_jacobian(z, x)
    assert torch.allclose(path.log_prob(x), expected, atol=1e-10)
    assert path.expand((2, 3)).log_prob(x[:, None].expand(4, 2, 3, 5, 2)).shape == (4, 2, 3)


def test_ar1_draws_have_the_stationary_covariance():
    torch.manual_seed(0)
    x = ar1().sample((40000,))
    assert torch.allclose(torch.cov(x.T), ar1_covariance(), atol=0.03)
    assert x.mean(0).abs().max() < 0.03


def test_a_single_state_is_the_initial_distribution():
    path = ar1(steps=1)
    x = torch.randn(5, 1, dtype=torch.float64)
    assert torch.allclose(path.log_prob(x), path.initial.log_prob(x[:, 0]))


def test_predictive_and_init_to_sample_work_in_a_model():
    def model(data=None):
        phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
        x = pyro.sample("x", af.GaussianPath(lambda x, t: (phi * x, 0.3), dist.Normal(0.0, 1.0), 6))
        pyro.sample("y", dist.Normal(x, 0.1).to_event(1), obs=data)

    draws = Predictive(model, num_samples=5)()
    assert draws["x"].shape == (5, 6) and draws["y"].shape == (5, 6)
    guide = af.AutoARFlow(model, init_loc_fn=init_to_sample, hidden_dims=[8])
    assert guide.median(torch.zeros(6))["x"].shape == (6,)


def test_pickles_with_a_module_level_transition():
    path = af.GaussianPath(_random_walk, dist.Normal(0.0, 1.0), 4)
    x = torch.randn(4)
    assert torch.allclose(pickle.loads(pickle.dumps(path)).log_prob(x), path.log_prob(x))


def _random_walk(x, t):
    return x, 0.5


@pytest.mark.parametrize(
    "transition, initial, steps, message",
    [
        ("not callable", dist.Normal(0.0, 1.0), 3, "transition must be callable"),
        (_random_walk, dist.Normal(0.0, 1.0), 0, "num_steps must be a positive int"),
        (_random_walk, dist.Gamma(1.0, 1.0), 3, "initial must be a Normal"),
        (_random_walk, dist.Normal(torch.zeros(2, 2), 1.0).to_event(2), 3, "initial must be"),
        (lambda x, t: (x, -1.0), dist.Normal(0.0, 1.0), 3, "not > 0"),
        (lambda x, t: (x, torch.nan), dist.Normal(0.0, 1.0), 3, "not > 0"),
        (lambda x, t: x, dist.Normal(0.0, 1.0), 3, "must return a pair"),
        (
            lambda x, t: (torch.zeros(5), 1.0),
            dist.Normal(torch.zeros(2), 1.0).to_event(1),
            3,
            "does not broadcast",
        ),
    ],
)
def test_bad_paths_raise_value_errors(transition, initial, steps, message):
    with pytest.raises(ValueError, match=message):
        af.GaussianPath(transition, initial, steps)


@pytest.mark.parametrize("steps", [4, 100])  # drawn in steps, then by Newton's method
def test_a_scale_that_turns_non_positive_later_is_caught_when_scored_and_drawn(steps):
    path = af.GaussianPath(lambda x, t: (x, 1.0 - 2 * t / steps), dist.Normal(0.0, 1.0), steps)
    with pytest.raises(ValueError, match="not > 0"):
        path.log_prob(torch.zeros(steps))
    with pytest.raises(ValueError, match="not > 0"):
        path.sample()


def random_correction(path: af.GaussianPath, batch: int, seed: int) -> PathCorrection:
    """Nonzero shifts, log scales, mixes (and within-step mixing for vector states)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (path.num_steps, batch, *path.state_shape)
    matrix = shape + path.state_shape[-1:] if path.state_shape else shape

    def noise(size, scale):
        return (scale * torch.randn(size, generator=generator, dtype=DOUBLE)).requires_grad_()

    return PathCorrection(
        shift=noise(shape, 0.3),
        mix=noise(matrix, 0.2),
        log_scale=noise(shape, 0.2),
        reference=torch.randn(shape, generator=generator, dtype=DOUBLE),
        lower=noise(matrix, 0.3) if path.state_shape else None,
    )


def swinging_path(steps: int) -> tuple[af.GaussianPath, list[torch.Tensor]]:
    """Scalar states with a nonlinear mean and a scale that reads the state."""
    gain = torch.tensor(0.8, dtype=DOUBLE, requires_grad=True)
    spread = torch.tensor(0.3, dtype=DOUBLE, requires_grad=True)

    def transition(x, t):
        return gain * torch.sin(x) + 0.05 * t, spread * (1.2 + torch.tanh(x))

    return af.GaussianPath(transition, dist.Normal(torch.tensor(0.5, dtype=DOUBLE), 1.0), steps), [
        gain,
        spread,
    ]


def rotating_path(steps: int) -> tuple[af.GaussianPath, list[torch.Tensor]]:
    """Vector states: a damped rotation with a nonlinear pull, and a learnable start."""
    angle = torch.tensor(0.3, dtype=DOUBLE, requires_grad=True)
    start = torch.tensor([1.0, -0.5], dtype=DOUBLE, requires_grad=True)

    def transition(x, t):
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotated = torch.stack(
            [cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1]]
        )
        return 0.9 * rotated.movedim(0, -1) - 0.05 * x**3 / (1 + x**2), 0.4

    return af.GaussianPath(transition, dist.Normal(start, 0.5).to_event(1), steps), [angle, start]


@pytest.mark.parametrize("make_path", [swinging_path, rotating_path])
@pytest.mark.parametrize("corrected", [False, True])
def test_the_newton_draw_is_the_sequential_draw_with_its_gradients(make_path, corrected):
    path, parameters = make_path(70)
    batch = 3
    correction = random_correction(path, batch, seed=5) if corrected else None
    if correction is not None:
        parameters = parameters + [correction.shift, correction.mix, correction.log_scale]
        if correction.lower is not None:
            parameters.append(correction.lower)
    z = torch.randn(
        (batch, *path.event_shape), dtype=DOUBLE, generator=torch.Generator().manual_seed(6)
    )
    z.requires_grad_()
    draws = {}
    for solver in ("sequential", "newton"):
        x, log_det = PathFlow(path, correction, solver=solver)._call_with_log_det(z)
        loss = (torch.sin(x)).sum() + log_det.sum()
        draws[solver] = (x, log_det, torch.autograd.grad(loss, parameters + [z], retain_graph=True))
    (x, log_det, grads), (x_n, log_det_n, grads_n) = draws["sequential"], draws["newton"]
    assert torch.allclose(x_n, x, atol=1e-9)
    assert torch.allclose(log_det_n, log_det, atol=1e-9)
    for newton, exact in zip(grads_n, grads, strict=True):
        assert torch.allclose(newton, exact, atol=1e-7)


def test_a_chaotic_path_falls_back_to_steps_and_newton_alone_says_why():
    """x_t = 3 sin(x_{t-1}) + noise: the linearization's products grow without bound."""
    path = af.GaussianPath(lambda x, t: (3.0 * torch.sin(x), 0.5), dist.Normal(0.0, 1.0), 300)
    z = torch.randn(2, 300)
    stepped = PathFlow(path, solver="sequential")(z)
    assert torch.equal(PathFlow(path)(z), stepped)
    with pytest.raises(ValueError, match="did not converge"):
        PathFlow(path, solver="newton")(z)
    with pytest.raises(ValueError, match="solver must be one of"):
        PathFlow(path, solver="scan")


def test_a_long_path_draws_exactly_the_stationary_ar1_in_one_newton_iteration():
    path = ar1(phi=0.95, steps=500)
    z = torch.randn(4, 500, dtype=DOUBLE)
    x = PathFlow(path, solver="newton")(z)
    # the draw's noise is recovered exactly by the one-pass inverse
    assert torch.allclose(PathFlow(path).inv(x), z, atol=1e-9)
    assert torch.allclose(path.log_prob(x), path.as_flow().log_prob(x), atol=1e-9)
