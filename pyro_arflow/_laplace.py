"""What both Laplace warm starts share: the model's log density at a guide's unconstrained latent
vector, its mode by L-BFGS, and the reversed Cholesky factor of a precision."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import biject_to

NO_MODE = (
    "the model's log density has no proper mode (a funnel, an unbounded direction); start "
    "the guide as it is built instead"
)
NEWTON_STEPS = 2
"""Newton steps after L-BFGS: exact for a Gaussian, quadratic convergence otherwise."""


def log_density(model: Callable, guide: Any, latent: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """The model's joint log density at the unconstrained ``latent``, plus the log-Jacobian
    of the map to the constrained values."""
    values = guide._constrain(latent)
    log_jacobian = latent.new_zeros(())
    for slot in guide._slots:
        piece = latent[slot.start : slot.start + slot.size].reshape(slot.unconstrained_shape)
        transform = biject_to(slot.support)
        log_jacobian = log_jacobian + transform.log_abs_det_jacobian(piece, values[slot.name]).sum()
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    return trace.log_prob_sum() + log_jacobian


NOT_POSITIVE_DEFINITE = f"the Hessian at the mode is not positive definite: {NO_MODE}"


def reversed_cholesky(precision: Tensor) -> Tensor:
    """``C`` lower triangular with a positive diagonal and ``C^T C = precision`` (batched over
    leading dimensions): the Cholesky factor of the reversed matrix, reversed. ``ValueError``
    unless ``precision`` is positive definite."""
    factor, positive = reversed_cholesky_ex(precision)
    if not bool(positive.all()):
        raise ValueError(NOT_POSITIVE_DEFINITE)
    return factor


def reversed_cholesky_ex(precision: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`reversed_cholesky` and, per matrix, whether it is positive definite; where it is
    not, the factor is the identity."""
    cholesky, info = torch.linalg.cholesky_ex(precision.flip(-2, -1))
    positive = (info == 0) & torch.isfinite(cholesky).all((-2, -1))
    identity = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    cholesky = torch.where(positive[..., None, None], cholesky, identity)
    return cholesky.flip(-2, -1).mT, positive


def find_mode(
    negative_log_density: Callable[[Tensor], Tensor], start: Tensor, max_iterations: int
) -> tuple[Tensor, int]:
    """The minimum of ``negative_log_density`` by L-BFGS (strong Wolfe line search) from
    ``start``, and the iterations taken; ``ValueError`` when the density is not finite at the
    start or the search leaves the floats (or the model's validation refuses a point)."""
    if not math.isfinite(float(negative_log_density(start))):
        raise ValueError("the model's log density is not finite at the guide's initial point")
    latent = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [latent], max_iter=max_iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = negative_log_density(latent)
        value.backward()
        return value

    try:
        optimizer.step(closure)
    except ValueError as error:  # the model's validation met a value past the search's reach
        raise ValueError(f"L-BFGS found no mode: {NO_MODE} (the model said: {error})") from None
    if not bool(torch.isfinite(latent).all()):
        raise ValueError(f"L-BFGS found no mode: {NO_MODE}")
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    return latent.detach(), int(iterations)
