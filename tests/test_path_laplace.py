"""The paths' Laplace approximations: the block algebra against dense matrices; a prior-structured
guide that lands on a linear-Gaussian path's exact posterior (given the globals) before any step,
and on the Laplace approximation of a nonlinear one; and ``paths="laplace"``, whose per-draw
Laplace is a linear-Gaussian path's exact conditional at any globals, differentiably."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import hessian, jacobian

import pyro_arflow as af
from pyro_arflow._laplace import log_density, reversed_cholesky
from pyro_arflow.path_laplace import (
    BlockBidiagonalFactor,
    block_tridiagonal_hessian,
    conditional_laplace,
)

pytestmark = pytest.mark.usefixtures("float64")


def dense_blocks(matrix: torch.Tensor, steps: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal blocks and those below of a dense (T k, T k) matrix, (T, k, k) each."""
    block = matrix.reshape(steps, size, steps, size).permute(0, 2, 1, 3)
    diagonal = torch.stack([block[t, t] for t in range(steps)])
    below = torch.stack([torch.zeros(size, size)] + [block[t, t - 1] for t in range(1, steps)])
    return diagonal, below


def random_precision(steps: int, size: int, seed: int) -> torch.Tensor:
    """A dense block-tridiagonal positive-definite matrix: B^T B + I, B block bidiagonal."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(steps * size, steps * size, generator=generator)
    band = torch.zeros(steps, steps)
    band.diagonal().fill_(1)
    band.diagonal(-1).fill_(1)
    factor = factor * torch.kron(band, torch.ones(size, size))
    return factor.T @ factor + torch.eye(steps * size)


@pytest.mark.parametrize("size", [1, 3])
def test_the_factor_is_the_precisions_and_solves_it(size):
    steps = 7
    precisions = [random_precision(steps, size, seed) for seed in (0, 1)]  # a batch of two
    blocks = [dense_blocks(h, steps, size) for h in precisions]
    diagonal = torch.stack([b[0] for b in blocks], dim=1)  # (T, 2, k, k)
    below = torch.stack([b[1] for b in blocks], dim=1)
    factor = BlockBidiagonalFactor.from_blocks(diagonal, below)
    rhs = torch.randn(steps, 2, size)
    solved = factor.solve(rhs)
    for member, precision in enumerate(precisions):
        dense = torch.zeros(steps * size, steps * size)
        for t in range(steps):
            rows = slice(t * size, (t + 1) * size)
            dense[rows, rows] = factor.diagonal[t, member]
            if t:
                dense[rows, (t - 1) * size : t * size] = factor.below[t, member]
        assert torch.allclose(dense.T @ dense, precision, atol=1e-10)
        exact = torch.linalg.solve(precision, rhs[:, member].reshape(-1))
        assert torch.allclose(solved[:, member].reshape(-1), exact, atol=1e-10)
    assert torch.allclose(factor.scales @ factor.diagonal, torch.eye(size).expand_as(diagonal))
    assert torch.allclose(factor.gains, -factor.scales @ factor.below)


def test_a_precision_that_is_not_positive_definite_is_refused():
    diagonal = torch.tensor([1.0, -1.0, 1.0]).reshape(3, 1, 1)
    with pytest.raises(ValueError, match="not positive definite"):
        BlockBidiagonalFactor.from_blocks(diagonal, torch.zeros(3, 1, 1))


def markov_density(x: torch.Tensor) -> torch.Tensor:
    """A non-Gaussian density over a path (T, k) whose terms read neighbouring states."""
    steps = (x[1:] - 0.9 * x[:-1].sin()).square().sum()
    return steps + x.cos().sum() + (x[..., 0] * x[..., -1]).square().sum()


def test_the_hessian_is_read_in_blocks_from_3k_products():
    path = torch.randn(9, 3)
    diagonal, below = block_tridiagonal_hessian(markov_density, path)
    dense = hessian(markov_density, path).reshape(27, 27)
    expected_diagonal, expected_below = dense_blocks(dense, 9, 3)
    assert torch.allclose(diagonal, expected_diagonal, atol=1e-10)
    assert torch.allclose(below, expected_below, atol=1e-10)


def test_a_density_coupling_states_two_apart_is_refused():
    def skipping(x):
        return markov_density(x) + (x[2:] * x[:-2]).sum()

    with pytest.raises(ValueError, match="not block tridiagonal"):
        block_tridiagonal_hessian(skipping, torch.randn(9, 3))


OBSERVED = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
DATA = torch.linspace(-1.0, 2.0, len(OBSERVED), dtype=torch.float64).sin()
TURN = torch.tensor([[0.9, 0.2], [-0.1, 0.8]], dtype=torch.float64)


def scalar_model(data):
    """An AR(1) path, observed with noise at some steps."""
    path = af.GaussianPath(lambda x, t: (0.8 * x, 0.7), dist.Normal(0.5, 1.0), len(data))
    x = pyro.sample("x", path)
    pyro.sample("y", dist.Normal(x, 0.4).mask(OBSERVED).to_event(1), obs=data)


def observed_turn(data, turn, noise):
    """A linear path of 2-vectors turned by ``turn`` at each step, a combination of them
    observed with noise ``noise``."""
    path = af.GaussianPath(
        lambda x, t: ((turn @ x.unsqueeze(-1)).squeeze(-1), torch.tensor([0.5, 0.3])),
        dist.Normal(torch.zeros(2), 1.0).to_event(1),
        len(data),
    )
    x = pyro.sample("x", path)
    seen = x[..., 0] + 0.5 * x[..., 1]
    pyro.sample("y", dist.Normal(seen, noise).mask(OBSERVED).to_event(1), obs=data)


def vector_model(data):
    """A linear path of 2-vectors (a damped turn), a combination of them observed."""
    observed_turn(data, TURN, 0.3)


def path_negative_log_joint(model, guide, theta=None, data=DATA):
    """-log p(x, y | theta) as a function of the path ``x`` (flat), the unconstrained globals
    held at ``theta`` (``None``: a model without globals)."""

    def negative_log_joint(path):
        latent = path if theta is None else torch.cat((theta, path))
        conditioned = pyro.poutine.condition(model, data=guide._constrain(latent))
        return -pyro.poutine.trace(conditioned).get_trace(data).log_prob_sum()

    return negative_log_joint


def exact_conditional(
    model, guide, theta: torch.Tensor | None = None
) -> torch.distributions.MultivariateNormal:
    """A linear-Gaussian path's exact law given the unconstrained globals ``theta`` (for a
    model without globals, its exact posterior)."""
    negative_log_joint = path_negative_log_joint(model, guide, theta)
    zero = torch.zeros(guide.latent_dim - (0 if theta is None else len(theta)))
    precision = hessian(negative_log_joint, zero)
    mean = -torch.linalg.solve(precision, torch.func.grad(negative_log_joint)(zero))
    return torch.distributions.MultivariateNormal(mean, precision_matrix=precision)


def independent_model(data):
    """A "path" whose step does not read the state before it: its Jacobian is zero."""
    x = pyro.sample("x", af.GaussianPath(lambda x, t: (0.3, 0.7), dist.Normal(0.5, 1.0), len(data)))
    pyro.sample("y", dist.Normal(x, 0.4).mask(OBSERVED).to_event(1), obs=data)


@pytest.mark.parametrize(
    "model",
    [scalar_model, vector_model, independent_model],
    ids=["scalar", "vector", "independent"],
)
def test_the_warm_start_is_a_linear_gaussian_paths_exact_posterior(model):
    guide = af.AutoARFlow(model)
    found = af.laplace_warm_start(model, guide, DATA)
    assert isinstance(found, af.PathLaplaceApproximation) and found.globals is None
    exact = exact_conditional(model, guide)
    latents = exact.sample((5,)) + torch.randn(5, guide.latent_dim)  # anywhere
    assert torch.allclose(guide.get_posterior(DATA).log_prob(latents), exact.log_prob(latents))
    assert torch.allclose(found.modes["x"].reshape(-1), exact.mean, atol=1e-8)
    assert torch.allclose(guide.median(DATA)["x"].reshape(-1), exact.mean, atol=1e-8)


def ar1_with_globals(data):
    persistence = pyro.sample("persistence", dist.Uniform(-1.0, 1.0))
    shock = pyro.sample("shock", dist.HalfNormal(1.0))
    path = af.GaussianPath(
        lambda x, t: (persistence.unsqueeze(-1) * x, shock.unsqueeze(-1)),
        dist.Normal(0.0, shock.unsqueeze(-1)),
        len(data),
    )
    x = pyro.sample("x", path)
    pyro.sample("y", dist.Normal(x, 0.4).mask(OBSERVED).to_event(1), obs=data)


def test_given_the_initial_globals_the_path_is_its_exact_conditional():
    """log q(theta_0, x) - log q(theta_0, x') is the exact conditional's log ratio."""
    guide = af.AutoARFlow(ar1_with_globals, hidden_dims=[8])
    found = af.laplace_warm_start(ar1_with_globals, guide, DATA)
    theta = found.globals
    assert torch.equal(theta, guide.loc.detach())
    exact = exact_conditional(ar1_with_globals, guide, theta)
    paths = exact.sample((4,)) + torch.randn(4, len(DATA))
    latents = torch.cat((theta.expand(4, 2), paths), dim=-1)
    guide_density = guide.get_posterior(DATA).log_prob(latents)
    ratios, exact_ratios = guide_density - guide_density[0], exact.log_prob(paths)
    assert torch.allclose(ratios, exact_ratios - exact_ratios[0], atol=1e-9)


def pendulum(data):
    """A nonlinear transition (a noisy pendulum's angle and speed) and a nonlinear likelihood."""

    def transition(x, t):
        angle, speed = x.unbind(-1)
        step = torch.stack([angle + 0.1 * speed, speed - 0.1 * angle.sin()], dim=-1)
        return step, torch.tensor([0.05, 0.2])

    start = dist.Normal(torch.tensor([1.0, 0.0]), 0.5).to_event(1)
    x = pyro.sample("x", af.GaussianPath(transition, start, len(data)))
    pyro.sample("y", dist.Normal(x[..., 0].sin(), 0.2).to_event(1), obs=data)


def test_a_nonlinear_path_starts_through_its_mode_with_the_laplace_covariance():
    """At z = 0 the guide's path is the mode, and its linearization there (J J^T of the
    transform) is the Laplace covariance, the inverse of the log density's Hessian."""
    data = torch.linspace(0.8, -0.5, 10)
    guide = af.AutoARFlow(pendulum)
    found = af.laplace_warm_start(pendulum, guide, data)
    transform = guide.get_transform(data)
    zero = torch.zeros(guide.latent_dim)
    assert torch.allclose(transform(zero), found.modes["x"].reshape(-1), atol=1e-8)

    negative_log_joint = path_negative_log_joint(pendulum, guide, data=data)
    mode = found.modes["x"].reshape(-1)
    assert torch.func.grad(negative_log_joint)(mode).abs().max() < 1e-6
    linear = jacobian(transform, zero)
    covariance = torch.linalg.inv(hessian(negative_log_joint, mode))
    assert torch.allclose(linear @ linear.T, covariance, atol=1e-8)


def skipping_model(data):
    """Observations of x_t - x_{t-2}: a likelihood no Markov step holds."""
    path = af.GaussianPath(lambda x, t: (x, 1.0), dist.Normal(0.0, 1.0), len(data))
    x = pyro.sample("x", path)
    pyro.sample("y", dist.Normal(x[..., 2:] - x[..., :-2], 0.1).to_event(1), obs=data[2:])


def test_fit_warm_starts_paths_by_default_and_warns_where_it_cannot():
    result = af.fit(scalar_model, af.AutoARFlow(scalar_model), DATA, max_steps=1, progress=False)
    assert isinstance(result.warm_start, af.PathLaplaceApproximation)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="not block tridiagonal"):
        af.laplace_warm_start(skipping_model, af.AutoARFlow(skipping_model), DATA)
    pyro.clear_param_store()
    with pytest.warns(RuntimeWarning, match="no Gaussian warm start.*not block tridiagonal"):
        result = af.fit(
            skipping_model, af.AutoARFlow(skipping_model), DATA, max_steps=1, progress=False
        )
    assert result.warm_start is None


@pytest.mark.parametrize("size", [1, 2])
def test_the_parallel_sweep_holds_in_float32_over_a_long_path(size):
    """The parallel sweep in float32, over 3000 scalar states (or 1500 2-vectors) of a random
    walk (rotating, for vectors) seen through noise 4.5 times its step (condition number ~ 80),
    factors and solves as float64's dense algebra does."""
    steps, seen = 3000 // size, 0.05
    angle = torch.tensor(0.3)
    rotation = torch.stack(
        (torch.stack((angle.cos(), -angle.sin())), torch.stack((angle.sin(), angle.cos())))
    )[:size, :size]
    shift_back = torch.diag(torch.ones(steps - 1), -1)  # x_{t-1} in row t
    walk = torch.eye(steps * size) - torch.kron(shift_back, rotation)
    observation = seen * torch.tensor([[1.0, 0.5], [0.5, 1.0]])[:size, :size]
    dense = walk.T @ walk + torch.kron(torch.eye(steps), observation)
    diagonal, below = dense_blocks(dense, steps, size)
    factor = BlockBidiagonalFactor.from_blocks(diagonal.float(), below.float())
    rhs = torch.randn(steps, size)
    exact = torch.linalg.solve(dense, rhs.reshape(-1))
    solved = factor.solve(rhs.float()).reshape(-1).double()
    assert (solved - exact).norm() < 1e-4 * exact.norm()
    exact_diagonal, _ = dense_blocks(reversed_cholesky(dense), steps, size)
    assert torch.allclose(factor.diagonal.double(), exact_diagonal, rtol=1e-4, atol=1e-5)


def test_a_batch_member_that_is_not_positive_definite_leaves_the_others_alone():
    """Block states: a member whose precision is indefinite in the middle of the path is
    flagged, its factor finite; the other member's factor is what it is alone."""
    steps, size = 9, 2
    diagonal, below = dense_blocks(random_precision(steps, size, 0), steps, size)
    indefinite = diagonal.clone()
    indefinite[4] -= 50 * torch.eye(size)
    batch = (torch.stack((diagonal, indefinite), 1), torch.stack((below, below), 1))
    factor, positive = BlockBidiagonalFactor.from_blocks_ex(*batch)
    assert positive.tolist() == [True, False]
    assert torch.isfinite(factor.diagonal).all() and torch.isfinite(factor.below).all()
    alone = BlockBidiagonalFactor.from_blocks(diagonal, below)
    assert torch.allclose(factor.diagonal[:, 0], alone.diagonal, atol=1e-12)
    assert torch.allclose(factor.below[:, 0], alone.below, atol=1e-12)


def turning_with_globals(data):
    """The damped turn of 2-vectors, its damping and the observations' noise unknown."""
    damping = pyro.sample("damping", dist.Uniform(0.5, 1.0))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    observed_turn(data, damping.unsqueeze(-1).unsqueeze(-1) * TURN, noise.unsqueeze(-1))


@pytest.mark.parametrize(
    "model", [ar1_with_globals, turning_with_globals], ids=["scalar", "vector"]
)
def test_per_draw_laplace_is_the_exact_conditional_at_any_globals(model):
    """``paths="laplace"`` as built (no warm start, no step): at globals away from the
    initial ones, log q(theta, x) - log q(theta, x') is the exact conditional's log ratio."""
    guide = af.AutoARFlow(model, paths="laplace", hidden_dims=[8])
    guide(DATA)
    posterior = guide.get_posterior(DATA)
    for theta in guide.loc.detach() + 0.5 * torch.randn(3, 2):
        exact = exact_conditional(model, guide, theta)
        paths = exact.sample((4,)) + torch.randn(4, exact.event_shape[0])
        density = posterior.log_prob(torch.cat((theta.expand(4, 2), paths), dim=-1))
        exact_density = exact.log_prob(paths)
        assert torch.allclose(density - density[0], exact_density - exact_density[0], atol=1e-8)


def test_per_draw_laplace_integrates_the_path_out_with_its_gradient():
    """log p(theta, x, y) - log q(x | theta) is log p(theta, y) whatever the path x, and its
    gradient in theta is that of log p(theta, y): the conditional is exact and differentiable
    in the globals, so an ELBO step moves the globals as the marginal posterior says."""
    guide = af.AutoARFlow(ar1_with_globals, paths="laplace", hidden_dims=[8])
    guide(DATA)
    theta = (guide.loc.detach() + torch.tensor([0.3, -0.4])).requires_grad_()

    def negative_log_joint(path):
        return -log_density(ar1_with_globals, guide, torch.cat((theta, path)), (DATA,), {})

    def integrand(path):
        latent = torch.cat((theta, path))
        log_q_path = guide.get_posterior(DATA).log_prob(latent) - guide._globals_log_density(theta)
        return -negative_log_joint(path) - log_q_path

    zero = torch.zeros(len(DATA), requires_grad=True)
    precision = hessian(negative_log_joint, zero, create_graph=True)
    (gradient,) = torch.autograd.grad(negative_log_joint(zero), zero, create_graph=True)
    mode = zero - torch.linalg.solve(precision, gradient)
    marginal = (
        -negative_log_joint(mode)
        + 0.5 * len(DATA) * torch.log(torch.tensor(2 * torch.pi))
        - 0.5 * torch.logdet(precision)
    )
    (marginal_gradient,) = torch.autograd.grad(marginal, theta)
    for path in torch.randn(2, len(DATA)):
        value = integrand(path)
        assert torch.allclose(value, marginal, atol=1e-8)
        (value_gradient,) = torch.autograd.grad(value, theta)
        assert torch.allclose(value_gradient, marginal_gradient, atol=1e-7)


def test_per_draw_laplace_refuses_a_likelihood_that_is_not_markov_when_built():
    with pytest.raises(ValueError, match="not block tridiagonal"):
        af.AutoARFlow(skipping_model, paths="laplace")(DATA)


def bumped(data):
    """An AR(1) path with a potential whose curvature a global sets: at a large enough
    ``bump`` the path's Hessian is not positive definite where no observation holds it."""
    bump = pyro.sample("bump", dist.Normal(0.0, 1.0))
    path = af.GaussianPath(lambda x, t: (0.8 * x, 0.7), dist.Normal(0.0, 1.0), len(data))
    x = pyro.sample("x", path)
    pyro.factor("curvature", 1.5 * bump * x.square().sum(-1))
    pyro.sample("y", dist.Normal(x, 0.4).mask(OBSERVED).to_event(1), obs=data)


def test_per_draw_laplace_draws_without_a_positive_definite_hessian_take_a_stand_in():
    """Where a draw's Hessian is not positive definite, that draw alone gets a block-Gershgorin
    lift of it: its parts are finite, its guide density is a density, and another draw's parts
    are what they are without it in the batch."""
    guide = af.AutoARFlow(bumped, paths="laplace", hidden_dims=[8])
    guide(DATA)
    residuals = {"x": guide.paths[0]}

    negative_log_joint = path_negative_log_joint(bumped, guide, torch.tensor([1.5]))
    curvature = hessian(negative_log_joint, residuals["x"].linearization)
    assert torch.linalg.eigvalsh(curvature)[0] < 0  # bump = 1.5: not positive definite

    def parts(bumps):
        values = {"bump": torch.tensor(bumps)}
        batch = torch.Size([len(bumps)])
        found = conditional_laplace(bumped, (DATA,), {}, residuals, values, batch)["x"]
        return dict(found.items())

    mixed, alone = parts([0.2, 1.5]), parts([0.2])
    for name, value in mixed.items():
        assert torch.isfinite(value).all(), name
        assert torch.allclose(value[:, 0], alone[name][:, 0], atol=1e-12), name

    def log_q(path):
        latent = torch.cat((torch.tensor([1.5]), path))
        return guide.get_posterior(DATA).log_prob(latent)

    # the guide's law of the path is Gaussian with a precision P that differs from the
    # Hessian H only on the diagonal, by a lift >= 0, zero on the rows that dominate in H; its
    # gradient at the linearization path is the model's (one Newton step with P for H)
    point = residuals["x"].linearization
    precision = -hessian(log_q, point)
    lift = (precision - curvature).diagonal()
    assert torch.allclose(precision - curvature, torch.diag(lift))
    assert (lift > -1e-10).all() and (lift > 1).any()
    rows = curvature.diagonal() - (curvature.abs().sum(-1) - curvature.diagonal().abs())
    assert torch.allclose(lift[rows > 0.01], torch.zeros(1))
    assert torch.linalg.eigvalsh(precision)[0] > 0
    model_gradient = -torch.func.grad(negative_log_joint)(point)
    at_point = point.clone().requires_grad_()
    (guide_gradient,) = torch.autograd.grad(log_q(at_point), at_point)
    assert torch.allclose(guide_gradient, model_gradient, atol=1e-8)
    bump = torch.tensor([1.5], requires_grad=True)  # and gradients reach the globals, finite
    (bump_gradient,) = torch.autograd.grad(
        guide.get_posterior(DATA).log_prob(torch.cat((bump, point))), bump
    )
    assert torch.isfinite(bump_gradient).all()
