r"""Markov recurrences :math:`x_t = F_t(x_{t-1})` solved over the whole path at once.

A path drawn from a Markov law is a recurrence: each state needs the one before it, so the
plain draw is :math:`T` steps. Two facts make it a few parallel passes instead:

- A *linear* recurrence :math:`x_t = a_t x_{t-1} + c_t` is the composition of the affine maps
  :math:`x \mapsto a_t x + c_t`, and composition is associative: an inclusive scan
  (Hillis and Steele 1986; Blelloch 1990) gives every :math:`x_t` in
  :math:`\lceil \log_2 T \rceil` rounds (:func:`linear_recurrence`).
- A *nonlinear* one is a root of :math:`x_t - F_t(x_{t-1}) = 0` for all :math:`t` together.
  Newton's method on it linearizes every step around the current guess,
  :math:`x^{n+1}_t = F_t(x^n_{t-1}) + J_t (x^{n+1}_{t-1} - x^n_{t-1})` with
  :math:`J_t = \partial F_t / \partial x_{t-1}`, a linear recurrence (DEER: Lim et al. 2024,
  https://arxiv.org/abs/2309.12252; Gonzalez et al. 2024, https://arxiv.org/abs/2407.19115).
  It is exact after one iteration when :math:`F` is affine, converges quadratically near the
  solution, and after :math:`n` iterations has the first :math:`n` states exactly
  (:func:`solve_markov_recurrence`).

Gradients: the returned path is one last Newton step taken under autograd from the converged
(detached) path :math:`x^*`, with :math:`J` held fixed. Its derivative in any parameter
:math:`\theta` of :math:`F` is :math:`(I - J S)^{-1} \partial F / \partial \theta` at
:math:`x^*` (:math:`S` the shift by one step), which is the implicit function theorem's
derivative of the solution: exact at convergence, without differentiating through the
iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["linear_recurrence", "solve_markov_recurrence"]

Step = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``step(x_prev) -> (x_next, scale)``: every step at once, time first; ``scale`` is the size
a state's error is measured in (a step's noise scale)."""


def linear_recurrence(coefficients: Tensor, offsets: Tensor, matrix: bool = False) -> Tensor:
    r"""The solution of :math:`x_0 = c_0`, :math:`x_t = a_t x_{t-1} + c_t` (:math:`t \ge 1`),
    every state at once, in :math:`\lceil \log_2 T \rceil` rounds of an inclusive scan.

    Arguments:
        coefficients: :math:`a_1 .. a_{T-1}`, time first: ``(T - 1, *batch, *state)``
            (elementwise), or ``(T - 1, *batch, k, k)`` matrices when ``matrix``; with as
            many dimensions as ``offsets`` (plus one when ``matrix``), broadcasting against it.
        offsets: :math:`c_0 .. c_{T-1}`, ``(T, *batch, *state)``.
        matrix: whether :math:`a_t` multiplies a state of size ``k`` as a matrix.

    Differentiable in both arguments. The backward pass is the adjoint recurrence, backward in
    time: :math:`\lambda_t = g_t + a_{t+1}^\top \lambda_{t+1}` gives
    :math:`\partial L / \partial c_t = \lambda_t` and :math:`\partial L / \partial a_t =
    \lambda_t x_{t-1}^\top`, one more scan instead of differentiating through this one.

    Example::

        >>> import torch
        >>> from pyro_arflow.recurrences import linear_recurrence
        >>> a, c = torch.full((3,), 0.5), torch.tensor([1.0, 1.0, 0.0, 2.0])
        >>> linear_recurrence(a, c)   # 1, 0.5 + 1, 0.75, 2.375
        tensor([1.0000, 1.5000, 0.7500, 2.3750])
    """
    num_steps = offsets.shape[0]
    if coefficients.shape[0] != num_steps - 1:
        raise ValueError(
            f"expected {num_steps - 1} coefficients (one per step after the first) for "
            f"{num_steps} offsets, got {coefficients.shape[0]}"
        )
    expected_dims = offsets.dim() + int(matrix)
    if coefficients.dim() != expected_dims:
        raise ValueError(
            f"expected coefficients with {expected_dims} dimensions for offsets of shape "
            f"{tuple(offsets.shape)}{' (matrices)' if matrix else ''}, got shape "
            f"{tuple(coefficients.shape)}"
        )
    return _AffineScan.apply(coefficients, offsets, matrix)


class _AffineScan(torch.autograd.Function):
    """:func:`linear_recurrence` with its adjoint as the backward pass."""

    @staticmethod
    def forward(ctx: Any, coefficients: Tensor, offsets: Tensor, matrix: bool) -> Tensor:
        values = _scan(coefficients, offsets, matrix)
        ctx.save_for_backward(coefficients, values)
        ctx.matrix = matrix
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, None]:
        coefficients, values = ctx.saved_tensors
        matrix = ctx.matrix
        backward_coefficients = coefficients.flip(0)
        if matrix:
            backward_coefficients = backward_coefficients.transpose(-1, -2)
        adjoint = linear_recurrence(backward_coefficients, grad.flip(0), matrix).flip(0)
        grad_coefficients = None
        if ctx.needs_input_grad[0]:
            if matrix:
                outer = adjoint[1:].unsqueeze(-1) @ values[:-1].unsqueeze(-2)
            else:
                outer = adjoint[1:] * values[:-1]
            grad_coefficients = outer.sum_to_size(coefficients.shape)
        return grad_coefficients, adjoint, None


def _scan(coefficients: Tensor, offsets: Tensor, matrix: bool) -> Tensor:
    """Hillis and Steele's inclusive scan of the affine maps (no autograd)."""
    num_steps = offsets.shape[0]
    values = offsets
    # the first map is constant (it reads no earlier state): a_0 = 0
    head = coefficients.new_zeros((1,) + coefficients.shape[1:])
    maps = torch.cat((head, coefficients))
    if not matrix:
        maps = maps.expand(values.shape)
    shift = 1
    while shift < num_steps:
        # element t becomes the composition of the maps shift..t back: x -> a_t (a x + c) + c_t
        if matrix:
            earlier = (maps[shift:] @ values[:-shift].unsqueeze(-1)).squeeze(-1)
            values = torch.cat((values[:shift], values[shift:] + earlier))
            if 2 * shift < num_steps:
                maps = torch.cat((maps[:shift], maps[shift:] @ maps[:-shift]))
        else:
            values = torch.cat(
                (values[:shift], torch.addcmul(values[shift:], maps[shift:], values[:-shift]))
            )
            if 2 * shift < num_steps:
                maps = torch.cat((maps[:shift], maps[shift:] * maps[:-shift]))
        shift *= 2
    return values


def step_jacobian(
    next_states: Tensor, previous: Tensor, vector_state: bool, differentiable: bool = False
) -> Tensor:
    r""":math:`J_t = \partial F_t / \partial x_{t-1}` of every step: elementwise
    (``vector_state`` false: each entry of ``next_states`` reads only its own entry of
    ``previous``), else ``(..., k, k)`` matrices, one backward pass per row. Detached unless
    ``differentiable`` (then a function of whatever else ``next_states`` reads)."""
    if not next_states.requires_grad:  # the step does not read the state
        shape = previous.shape + previous.shape[-1:] if vector_state else previous.shape
        return previous.new_zeros(shape)

    def gradient(output: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(
            output.sum(),
            previous,
            retain_graph=True,
            create_graph=differentiable,
            allow_unused=True,
        )
        return torch.zeros_like(previous) if grad is None else grad

    if not vector_state:
        return gradient(next_states)
    size = next_states.shape[-1]
    return torch.stack([gradient(next_states[..., row]) for row in range(size)], dim=-2)


def _same_slope(
    after: Tensor, previous: Tensor, jacobian: Tensor, vector_state: bool, tolerance: float
) -> bool:
    """Whether the step's Jacobian along the solution is the one it was linearized with."""
    with torch.enable_grad():
        slope = step_jacobian(after, previous, vector_state)
    difference = (slope - jacobian.detach()).abs()
    return bool((difference <= tolerance * (1 + jacobian.detach().abs())).all())


def solve_markov_recurrence(
    step: Step,
    first: Tensor,
    guess: Tensor,
    vector_state: bool,
    max_iterations: int,
    tolerance: float | None = None,
) -> tuple[Tensor, Tensor, int] | None:
    r"""The path :math:`x_0 = ` ``first``, :math:`x_t = F_t(x_{t-1})` by Newton's method over
    the whole path (module docstring), or ``None`` when it has not converged in
    ``max_iterations`` (or left the floats).

    Arguments:
        step: ``step(x_prev) -> (x_next, scale)``: :math:`F_t` of every step at once, time
            first (``x_prev`` is ``(T - 1, *batch, *state)``); differentiable in ``x_prev``.
        first: :math:`x_0`, ``(*batch, *state)``.
        guess: the first iterate, ``(T, *batch, *state)``.
        vector_state: whether the states are vectors (the last dimension), so that
            :math:`J_t` is a matrix.
        max_iterations: the most Newton steps taken.
        tolerance: how many of its ``scale`` a state may miss its step by; default
            ``10 * sqrt(eps)`` of the dtype.

    An iterate is the solution when it misses no step by more than the tolerance, and either
    the Newton step that made it moved no state by more than the tolerance or :math:`J` is the
    same at both ends of that step (an affine :math:`F`: one iteration). The Jacobians the
    solution was built from are differentiable, so for an affine :math:`F` its gradients are
    exact from any guess, and for any :math:`F` at convergence.

    Returns the path (differentiable in ``first`` and in whatever ``step`` reads besides
    ``x_prev``), ``step``'s ``scale`` along it (differentiable, through the path too), and the
    number of Newton steps taken.

    Example::

        >>> import torch
        >>> from pyro_arflow.recurrences import solve_markov_recurrence
        >>> step = lambda x: (torch.sin(x) + 0.1, torch.ones_like(x))
        >>> path, _, iterations = solve_markov_recurrence(
        ...     step, torch.tensor(1.0), torch.zeros(40), vector_state=False, max_iterations=20
        ... )
        >>> x = torch.tensor(1.0)
        >>> for _ in range(39):
        ...     x = torch.sin(x) + 0.1
        >>> bool(torch.isclose(path[-1], x)), iterations < 10
        (True, True)
    """
    if tolerance is None:
        tolerance = 10 * torch.finfo(guess.dtype).eps ** 0.5
    grad_wanted = torch.is_grad_enabled()
    iterate = guess.detach()
    for iteration in range(1, max_iterations + 1):
        held = iterate[:-1].detach().requires_grad_()
        with torch.enable_grad():
            next_states, _ = step(held)
            jacobian = step_jacobian(next_states, held, vector_state, differentiable=grad_wanted)
        with torch.set_grad_enabled(grad_wanted):
            held = held.detach()
            linear = (
                (jacobian @ held.unsqueeze(-1)).squeeze(-1) if vector_state else jacobian * held
            )
            start = first.expand(held.shape[1:]).unsqueeze(0)
            solution = linear_recurrence(
                jacobian, torch.cat((start, next_states - linear)), matrix=vector_state
            )
        # the step along the solution: the check, and the scales the caller needs
        with torch.enable_grad():
            previous = solution[:-1]
            if not previous.requires_grad:
                previous = previous.detach().requires_grad_()
            after, scale = step(previous)
        with torch.no_grad():
            size = scale.detach()
            missed, moved = (
                ((solution[1:] - reached).abs() / size).amax() for reached in (after, iterate[1:])
            )
            missed, moved = torch.stack((missed, moved)).tolist()  # one synchronization
        if not (math.isfinite(missed) and math.isfinite(moved)):
            return None
        if missed <= tolerance and (
            moved <= tolerance or _same_slope(after, previous, jacobian, vector_state, tolerance)
        ):
            if not grad_wanted:
                scale = scale.detach()
            return solution, scale, iteration
        iterate = solution.detach()
    return None
