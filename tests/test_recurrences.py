"""Markov recurrences solved in parallel: the scan and Newton's method against the plain loop."""

from __future__ import annotations

import pytest
import torch

from pyro_arflow.recurrences import linear_recurrence, solve_markov_recurrence

DOUBLE = torch.float64


def loop(step, first: torch.Tensor, num_steps: int) -> torch.Tensor:
    """x_0 = first, x_t = step(x_{t-1}, t): the recurrence one state at a time."""
    states = [first]
    for t in range(1, num_steps):
        states.append(step(states[-1], t))
    return torch.stack(states)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 64, 100])
def test_scalar_scan_is_the_loop(num_steps):
    generator = torch.Generator().manual_seed(num_steps)
    a = torch.randn(num_steps - 1, 3, generator=generator, dtype=DOUBLE)
    c = torch.randn(num_steps, 3, generator=generator, dtype=DOUBLE)
    expected = loop(lambda x, t: a[t - 1] * x + c[t], c[0], num_steps)
    assert torch.allclose(linear_recurrence(a, c), expected, atol=1e-10)


def test_matrix_scan_is_the_loop_and_broadcasts_its_coefficients():
    generator = torch.Generator().manual_seed(0)
    a = 0.6 * torch.randn(40, 1, 3, 3, generator=generator, dtype=DOUBLE)  # shared by the batch
    c = torch.randn(41, 2, 3, generator=generator, dtype=DOUBLE)
    expected = loop(lambda x, t: (a[t - 1] @ x.unsqueeze(-1)).squeeze(-1) + c[t], c[0], 41)
    assert torch.allclose(linear_recurrence(a, c, matrix=True), expected, atol=1e-10)


@pytest.mark.parametrize("matrix", [False, True])
def test_scan_gradients_and_second_derivatives(matrix):
    generator = torch.Generator().manual_seed(1)
    shape = (12, 2, 3, 3) if matrix else (12, 1, 3)  # broadcasting coefficients
    a = (0.5 * torch.randn(shape, generator=generator, dtype=DOUBLE)).requires_grad_()
    c = torch.randn(13, 2, 3, generator=generator, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: linear_recurrence(a, c, matrix), (a, c))
    assert torch.autograd.gradgradcheck(lambda a, c: linear_recurrence(a, c, matrix), (a, c))


@pytest.mark.parametrize(
    "coefficients, offsets, matrix, message",
    [
        (torch.ones(3), torch.ones(3), False, "expected 2 coefficients"),
        (torch.ones(2), torch.ones(3, 2), False, "with 2 dimensions"),
        (torch.ones(2, 2), torch.ones(3, 2), True, "with 3 dimensions"),
    ],
)
def test_scan_rejects_mismatched_shapes(coefficients, offsets, matrix, message):
    with pytest.raises(ValueError, match=message):
        linear_recurrence(coefficients, offsets, matrix)


def test_newton_solves_a_nonlinear_recurrence_with_the_loops_gradients():
    """The solution and its gradients in the step's parameters and the first state are the
    loop's (the implicit function theorem at convergence)."""
    generator = torch.Generator().manual_seed(2)
    num_steps = 80
    gain = torch.tensor(0.9, dtype=DOUBLE, requires_grad=True)
    forcing = torch.randn(num_steps, 4, generator=generator, dtype=DOUBLE).requires_grad_()
    first = torch.randn(4, generator=generator, dtype=DOUBLE, requires_grad=True)

    def step(previous):
        return gain * torch.tanh(previous) + 0.1 * previous**2 / (1 + previous**2) + forcing[1:], (
            torch.ones_like(previous)
        )

    solved, scale, iterations = solve_markov_recurrence(
        step, first, torch.zeros(num_steps, 4, dtype=DOUBLE), False, max_iterations=30
    )
    expected = loop(
        lambda x, t: gain * torch.tanh(x) + 0.1 * x**2 / (1 + x**2) + forcing[t], first, num_steps
    )
    assert 1 < iterations < 30
    assert torch.allclose(solved, expected, atol=1e-10)
    assert scale.shape == (num_steps - 1, 4)
    weights = torch.randn(num_steps, 4, generator=generator, dtype=DOUBLE)
    ours = torch.autograd.grad((weights * solved).sum(), [gain, forcing, first])
    theirs = torch.autograd.grad((weights * expected).sum(), [gain, forcing, first])
    for mine, exact in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, exact, atol=1e-8)


def test_an_affine_step_takes_one_iteration_with_exact_gradients_from_any_guess():
    generator = torch.Generator().manual_seed(3)
    matrix = (0.4 * torch.randn(3, 3, generator=generator, dtype=DOUBLE)).requires_grad_()
    offset = torch.randn(3, generator=generator, dtype=DOUBLE, requires_grad=True)
    first = torch.zeros(3, dtype=DOUBLE)

    def step(previous):
        return previous @ matrix.T + offset, torch.ones_like(previous)

    far_guess = 50 * torch.randn(30, 3, generator=generator, dtype=DOUBLE)
    solved, _, iterations = solve_markov_recurrence(step, first, far_guess, True, 10)
    expected = loop(lambda x, t: x @ matrix.T + offset, first, 30)
    assert iterations == 1
    assert torch.allclose(solved, expected, atol=1e-10)
    ours = torch.autograd.grad(solved.square().sum(), [matrix, offset])
    theirs = torch.autograd.grad(expected.square().sum(), [matrix, offset])
    for mine, exact in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, exact, atol=1e-8)


def test_a_recurrence_whose_linearization_explodes_is_reported_unsolved():
    """x_t = 3 sin(x_{t-1}) + noise is chaotic: over 200 steps the linearized recurrence's
    products leave the floats, and the solve says so instead of returning garbage."""
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(200, generator=generator)

    def step(previous):
        return 3.0 * torch.sin(previous) + noise[1:], torch.ones_like(previous)

    assert solve_markov_recurrence(step, noise[0], torch.zeros(200), False, 8) is None


def test_without_autograd_the_solution_is_detached():
    weight = torch.tensor(0.5, requires_grad=True)

    def step(previous):
        return weight * previous + 1.0, torch.ones_like(previous)

    with torch.no_grad():
        solved, scale, _ = solve_markov_recurrence(
            step, torch.tensor(0.0), torch.zeros(9), False, 5
        )
    assert not solved.requires_grad and not scale.requires_grad
    assert torch.allclose(solved[-1], torch.tensor(2.0 - 2.0 * 0.5**8))
