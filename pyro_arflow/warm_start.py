r"""A Gaussian warm start: the guide's affine and linear autoregression at the Laplace
approximation, before the flow takes a step.

At the mode :math:`\hat u` of the model's log density in the unconstrained space, with
Hessian :math:`H` of the negative log density there, the Laplace approximation is
:math:`\mathcal{N}(\hat u, H^{-1})`. Factor the precision as :math:`H = A^\top A` with
:math:`A` lower triangular (the reversed Cholesky factor), and write
:math:`A = (I - B)\, S^{-1}`, :math:`S = \mathrm{diag}(1 / A_{ii})`, :math:`B` strictly lower
triangular. Then

.. math::

    u = \hat u + S\, (I - B)^{-1} z, \qquad z \sim \mathcal{N}(0, I)

has precision :math:`S^{-1} (I - B)^\top (I - B) S^{-1} = H`: exactly the guide's
``loc + scale * LinearAutoregression(z)`` with its IAF layers at the identity, as they start.
A guide without a dense linear autoregression gets the marginal sds, :math:`S =
\mathrm{diag}(H^{-1})^{1/2}`. The flow then spends its steps on what is not Gaussian.

A mode needs a log density that has one: a hierarchical model's funnel (a scale and the
values it scales, both latent) has none, and its Hessian is then not positive definite; the
warm start says so rather than start there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checks import check_positive_int
from ._laplace import NEWTON_STEPS, NO_MODE, find_mode, log_density, reversed_cholesky
from .linear import LinearAutoregression
from .path_laplace import PathLaplaceApproximation, path_laplace_warm_start

__all__ = ["LaplaceApproximation", "laplace_warm_start"]


@dataclass
class LaplaceApproximation:
    """What :func:`laplace_warm_start` found, in the guide's unconstrained coordinates.

    Attributes:
        loc: the mode.
        precision: the Hessian of the negative log density at the mode.
        log_density: the log density at the mode (the model's joint plus the log-Jacobian of
            the map to the constrained values).
        iterations: L-BFGS iterations taken.

    Example::

        >>> import torch, pyro_arflow as af
        >>> precision = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> found = af.LaplaceApproximation(torch.zeros(2), precision, -1.8, 3)
        >>> torch.allclose(found.covariance @ precision, torch.eye(2))
        True
    """

    loc: Tensor
    precision: Tensor
    log_density: float
    iterations: int

    @property
    def covariance(self) -> Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(self.precision))


def laplace_warm_start(
    model: Callable, guide: Any, *args: Any, max_iterations: int = 500, **kwargs: Any
) -> LaplaceApproximation | PathLaplaceApproximation:
    """Put an :class:`~pyro_arflow.AutoARFlow` at the model's Laplace approximation.

    Without latent paths (module docstring): ``loc`` at the mode, ``scale`` and the first
    dense :class:`~pyro_arflow.LinearAutoregression` of its flow at the Hessian's factors;
    returns a :class:`LaplaceApproximation`. With paths (:mod:`pyro_arflow.path_laplace`): the
    globals stay at the guide's initial point, and each path's residual is set so that the
    guide's law of the paths given those globals is their Laplace approximation; returns a
    :class:`~pyro_arflow.path_laplace.PathLaplaceApproximation`.

    Arguments:
        model, guide: the model and a guide that has not trained yet (its IAF layers at the
            identity, as built); ``*args`` and ``**kwargs`` are the model's arguments.
        max_iterations: most L-BFGS iterations to the mode.

    Raises ``ValueError`` for a log density that is not finite at the start, a mode whose
    Hessian is not positive definite, and (paths) a Hessian that is not block tridiagonal in
    time: a likelihood that couples a path's states further apart than neighbours.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model():
        ...     pyro.sample("x", dist.LogNormal(0.0, 2.0))
        >>> guide = af.AutoARFlow(model, hidden_dims=[8])
        >>> found = af.laplace_warm_start(model, guide)
        >>> round(guide.median()["x"].item(), 4), round(guide.scale.item(), 4)  # exact here
        (1.0, 2.0)
    """
    check_positive_int(max_iterations, "max_iterations")
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    if guide._has_paths():
        return path_laplace_warm_start(model, guide, args, kwargs, max_iterations)
    with torch.no_grad():
        start = guide.loc.detach().clone()

    def negative_log_density(latent: Tensor) -> Tensor:
        return -log_density(model, guide, latent, args, kwargs)

    mode, iterations = find_mode(negative_log_density, start, max_iterations)
    precision = _hessian(negative_log_density, mode)
    for _ in range(NEWTON_STEPS):  # L-BFGS stops on small changes; Newton polishes the mode
        gradient = torch.func.grad(negative_log_density)(mode)
        polished = mode - torch.linalg.solve(precision, gradient)
        if torch.equal(polished, mode):  # converged to the last bit: the Hessian stands
            break
        mode = polished
        precision = _hessian(negative_log_density, mode)
    found = LaplaceApproximation(mode, precision, -float(negative_log_density(mode)), iterations)
    _set_gaussian(guide, found)
    return found


def _hessian(negative_log_density: Callable[[Tensor], Tensor], mode: Tensor) -> Tensor:
    """The symmetrized Hessian at ``mode``; ``ValueError`` unless it is finite and positive
    definite."""
    precision = torch.autograd.functional.hessian(negative_log_density, mode)
    precision = (precision + precision.T) / 2
    if not bool(torch.isfinite(precision).all()) or torch.linalg.cholesky_ex(precision).info:
        raise ValueError(f"the Hessian at the mode is not positive definite: {NO_MODE}")
    return precision


def _set_gaussian(guide: Any, found: LaplaceApproximation) -> None:
    """``loc``, ``scale`` and a linear autoregression such that ``loc + scale * (I - B)^{-1}
    z`` is ``found`` (its marginal sds alone without such a layer)."""
    mode = found.loc
    linear = next(
        (
            module
            for module in guide.flow.modules()
            if isinstance(module, LinearAutoregression) and module.bandwidth is None
        ),
        None,
    )
    if linear is None:
        scale = found.covariance.diagonal().sqrt()
    else:  # the factorization in the layer's ordering
        ordering = linear.ordering.to(mode.device)
        # A lower triangular, A^T A = the precision permuted into the layer's ordering
        in_ordering = reversed_cholesky(found.precision[ordering][:, ordering])
        diagonal = in_ordering.diagonal()
        scale = torch.empty_like(mode)
        scale[ordering] = 1.0 / diagonal
        with torch.no_grad():
            identity = torch.eye(len(mode), dtype=mode.dtype, device=mode.device)
            linear.weight.copy_((identity - in_ordering / diagonal).tril(-1))
    guide.loc = mode.clone()
    guide.scale = scale
