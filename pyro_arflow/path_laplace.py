r"""A Gaussian warm start for the latent paths of a prior-structured guide: each path's Laplace
approximation given the globals, written in the guide's own step.

Hold the globals at the guide's initial :math:`\theta_0`. Let :math:`\hat x` be the mode of
:math:`\log p(x, y \mid \theta_0)` over the paths and :math:`H` the Hessian of its negative
there. When each observation reads one state of a Markov path, :math:`H` is block tridiagonal
in time (blocks of the state size :math:`k`: a Gaussian Markov random field, Rue and Held 2005),
and its reversed Cholesky factor is block bidiagonal: :math:`H = A^\top A` with :math:`A` block
lower bidiagonal, diagonal blocks :math:`C_t` (lower
triangular) and blocks :math:`F_t` below them (:class:`BlockBidiagonalFactor`, found by one
backward sweep). Row block :math:`t` of :math:`A (x - \hat x)` is
:math:`C_t (x_t - \hat x_t) + F_t (x_{t-1} - \hat x_{t-1})`, so :math:`\mathcal{N}(\hat x,
H^{-1})` is the forward Markov chain

.. math::

    x_t = \hat x_t + M_t (x_{t-1} - \hat x_{t-1}) + S_t z_t, \qquad
    S_t = C_t^{-1}, \quad M_t = -S_t F_t,

which the structured guide's step (:mod:`pyro_arflow.structured`) holds: with :math:`f_t, g_t`
the prior's mean and scale and :math:`J_t = \partial f_t / \partial x_{t-1}` at the mode, the
mix solves :math:`(I + A_t) J_t = M_t`, the within-step mixing and log scale factor
:math:`S_t = (I + L_t)\,\mathrm{diag}(g_t e^{\rho_t})`, and the shift puts the mean at
:math:`\hat x_t`. The guide then starts at the Laplace approximation of the paths given
:math:`\theta_0`: exact for a linear-Gaussian path, near the posterior's bulk for a nonlinear one
(where the prior's free path can lie far off: a bridge between two lobes of a Lorenz-63
attractor), and the training steps go to what is not Gaussian. A mix past
:data:`~pyro_arflow.structured.MIX_BOUNDS` is clipped to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from torch import Tensor

from ._laplace import NEWTON_STEPS, find_mode, log_density, reversed_cholesky
from ._params import module_context
from .recurrences import step_jacobian
from .structured import MIX_BOUNDS, PathResidual, bounded_mix_inverse, global_positions

__all__ = ["BlockBidiagonalFactor", "PathLaplaceApproximation", "block_tridiagonal_hessian"]

COUPLING_TOLERANCE = 1e-3
"""Relative error past which a random probe says the Hessian is not block tridiagonal."""


@dataclass
class BlockBidiagonalFactor:
    r"""A block lower bidiagonal :math:`A` with :math:`A^\top A = H`, for a block tridiagonal
    precision :math:`H` over a path of :math:`T` states of size :math:`k` (any batch dims after
    time).

    Attributes:
        diagonal: :math:`C_t`, lower triangular with a positive diagonal, ``(T, *batch, k, k)``.
        below: :math:`F_t` (:math:`F_0 = 0`), ``(T, *batch, k, k)``.

    Example::

        >>> import torch
        >>> from pyro_arflow.path_laplace import BlockBidiagonalFactor
        >>> H = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 2.0, -1.0], [0.0, -1.0, 2.0]])
        >>> diagonal = H.diagonal().reshape(3, 1, 1)
        >>> below = torch.cat((torch.zeros(1), H.diagonal(-1))).reshape(3, 1, 1)
        >>> factor = BlockBidiagonalFactor.from_blocks(diagonal, below)
        >>> g = torch.tensor([1.0, 0.0, 1.0]).reshape(3, 1)
        >>> torch.allclose(factor.solve(g).reshape(3), torch.linalg.solve(H, g.reshape(3)))
        True
    """

    diagonal: Tensor
    below: Tensor

    @classmethod
    def from_blocks(cls, diagonal: Tensor, below: Tensor) -> BlockBidiagonalFactor:
        r"""The factor of the precision with diagonal blocks ``diagonal`` (:math:`H_{tt}`) and
        blocks ``below`` (:math:`H_{t, t-1}`; the first ignored), both ``(T, *batch, k, k)``,
        by one backward sweep: :math:`C_t^\top C_t = H_{tt} - F_{t+1}^\top F_{t+1}`,
        :math:`F_t = C_t^{-\top} H_{t, t-1}`. ``ValueError`` unless ``H`` is positive
        definite."""
        num_steps = len(diagonal)
        blocks: list[Tensor] = [diagonal.new_empty(0)] * num_steps
        belows: list[Tensor] = [torch.zeros_like(diagonal[0])] * num_steps
        remaining = diagonal[-1]
        for t in range(num_steps - 1, -1, -1):
            blocks[t] = reversed_cholesky(remaining)
            if t == 0:
                break
            belows[t] = torch.linalg.solve_triangular(blocks[t].mT, below[t], upper=True, left=True)
            remaining = diagonal[t - 1] - belows[t].mT @ belows[t]
        return cls(torch.stack(blocks), torch.stack(belows))

    @property
    def scales(self) -> Tensor:
        """:math:`S_t = C_t^{-1}`: the chain's noise factor at every step (lower triangular)."""
        identity = torch.eye(self.diagonal.shape[-1]).to(self.diagonal)
        return torch.linalg.solve_triangular(self.diagonal, identity, upper=False)

    @property
    def gains(self) -> Tensor:
        """:math:`M_t = -C_t^{-1} F_t`: how the chain's mean at step ``t`` follows the state
        before (:math:`M_0 = 0`)."""
        return -torch.linalg.solve_triangular(self.diagonal, self.below, upper=False)

    def solve(self, rhs: Tensor) -> Tensor:
        r""":math:`H^{-1} g` for ``rhs`` :math:`g` shaped ``(T, *batch, k)``: :math:`A^\top w =
        g` backward in time, then :math:`A d = w` forward."""
        column = rhs.unsqueeze(-1)
        num_steps = len(column)
        w: list[Tensor] = [column[0]] * num_steps
        for t in range(num_steps - 1, -1, -1):
            carried = (
                column[t] if t == num_steps - 1 else column[t] - self.below[t + 1].mT @ w[t + 1]
            )
            w[t] = torch.linalg.solve_triangular(self.diagonal[t].mT, carried, upper=True)
        d: list[Tensor] = []
        for t in range(num_steps):
            carried = w[t] if t == 0 else w[t] - self.below[t] @ d[-1]
            d.append(torch.linalg.solve_triangular(self.diagonal[t], carried, upper=False))
        return torch.stack(d).squeeze(-1)


def block_tridiagonal_hessian(
    negative_log_density: Callable[[Tensor], Tensor], path: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The Hessian of ``negative_log_density`` at ``path`` (time first, ``(T, *batch, k)``),
    read as block tridiagonal in time, from :math:`3k` Hessian-vector products: a probe that is
    1 at coordinate :math:`j` of every third state (times :math:`\equiv c \bmod 3`) returns, at
    each state, its column :math:`j` against the one neighbour (or itself) of that colour.

    Returns the diagonal blocks :math:`H_{tt}` and those below, :math:`H_{t, t-1}` (the first
    zero), each ``(T, *batch, k, k)``. A random probe checks the reading; ``ValueError`` when
    the density couples states further apart (or batch members with each other).
    """
    point = path.detach().requires_grad_()
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(negative_log_density(point), point, create_graph=True)

    def product(probe: Tensor) -> Tensor:
        (result,) = torch.autograd.grad(gradient, point, probe, retain_graph=True)
        return result

    num_steps, size = path.shape[0], path.shape[-1]
    colour = torch.arange(num_steps, device=path.device) % 3
    colour = colour.reshape((-1,) + (1,) * (path.dim() - 1))
    columns = {}  # (colour, j) -> H @ probe, shaped like path
    for c in range(3):
        for j in range(size):
            probe = torch.zeros_like(path)
            probe[..., j] = 1.0
            columns[c, j] = product(probe * (colour == c))
    times = torch.arange(num_steps, device=path.device)

    def blocks(offset: int) -> Tensor:
        """``H[t, t - offset]``: at state ``t``, the columns of colour ``(t - offset) mod 3``."""
        picked = [
            torch.stack([columns[c, j] for j in range(size)], dim=-1)  # (T, *batch, k, k)
            for c in range(3)
        ]
        chosen = torch.stack(picked)[(times - offset) % 3, times]
        return chosen if offset == 0 else torch.cat((torch.zeros_like(chosen[:1]), chosen[1:]))

    diagonal, below = blocks(0), blocks(1)
    diagonal = (diagonal + diagonal.mT) / 2
    probe = torch.randn_like(path)
    exact = product(probe)
    column = probe.unsqueeze(-1)
    read = (diagonal @ column).squeeze(-1)
    read[1:] += (below[1:] @ column[:-1]).squeeze(-1)
    read[:-1] += (below[1:].mT @ column[1:]).squeeze(-1)
    if float((read - exact).norm()) > COUPLING_TOLERANCE * float(exact.norm()):
        raise ValueError(
            "the model's log density couples a path's states further apart than neighbours "
            "(or one path's batch members with each other): its Hessian is not block "
            "tridiagonal in time, which the Markov warm start needs"
        )
    return diagonal.detach(), below.detach()


@dataclass
class PathLaplaceApproximation:
    """What :func:`~pyro_arflow.laplace_warm_start` found for a guide with latent paths.

    Attributes:
        globals: the unconstrained globals the paths were conditioned on (the guide's initial
            point), or ``None`` for a model without globals.
        modes: each path site's mode given the globals, shaped as the site.
        factors: each path site's precision factor (time first, states as ``(k,)``).
        log_density: the model's log density at the mode.
        iterations: L-BFGS iterations taken.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model():
        ...     path = pyro.sample("x", af.GaussianPath(
        ...         lambda x, t: (0.9 * x, torch.ones_like(x)), dist.Normal(0.0, 1.0), 20))
        ...     pyro.sample("y", dist.Normal(path, 0.5).to_event(1), obs=torch.ones(20))
        >>> found = af.laplace_warm_start(model, af.AutoARFlow(model))
        >>> found.modes["x"].shape, found.factors["x"].diagonal.shape
        (torch.Size([20]), torch.Size([20, 1, 1]))
    """

    globals: Tensor | None
    modes: dict[str, Tensor]
    factors: dict[str, BlockBidiagonalFactor]
    log_density: float
    iterations: int


def path_laplace_warm_start(
    model: Callable, guide: Any, args: tuple, kwargs: dict, max_iterations: int
) -> PathLaplaceApproximation:
    """Put every path residual of ``guide`` (built, not yet trained) at its path's Laplace
    approximation given the guide's initial globals (module docstring)."""
    with torch.no_grad(), module_context(guide):
        start = guide.get_transform(*args, **kwargs)(guide.get_base_dist().mean).detach()
    global_index = global_positions(guide._slots)
    path_slots = [slot for slot in guide._slots if slot.global_start is None]
    path_index = torch.tensor(
        [i for slot in path_slots for i in range(slot.start, slot.start + slot.size)],
        device=start.device,
    )

    def latent_with(paths: Tensor) -> Tensor:
        latent = start.clone()
        latent[path_index] = paths
        return latent

    def negative_log_density(paths: Tensor) -> Tensor:
        return -log_density(model, guide, latent_with(paths), args, kwargs)

    mode, iterations = find_mode(negative_log_density, start[path_index], max_iterations)
    factors = _factors(negative_log_density, mode, path_slots)
    value = negative_log_density(mode.requires_grad_())
    for _ in range(NEWTON_STEPS):  # each kept only if it raises the log density
        (gradient,) = torch.autograd.grad(value, mode)
        mode = mode.detach()
        step = torch.cat(
            [
                _from_time_first(factors[slot.name].solve(_time_first(piece, slot)), slot)
                for slot, piece in zip(path_slots, _pieces(gradient, path_slots), strict=True)
            ]
        )
        polished = (mode - step).requires_grad_()
        polished_value = negative_log_density(polished)
        if not float(polished_value.detach()) < float(value.detach()):
            break
        mode, value = polished, polished_value
        factors = _factors(negative_log_density, mode.detach(), path_slots)
    mode = mode.detach()
    latent = latent_with(mode)
    modes = {
        slot.name: piece.reshape(slot.unconstrained_shape)
        for slot, piece in zip(path_slots, _pieces(mode, path_slots), strict=True)
    }
    priors = _path_priors(model, guide, latent, args, kwargs)
    for slot, residual in zip(path_slots, guide.paths, strict=True):
        _set_residual(residual, priors[slot.name], modes[slot.name], factors[slot.name])
    return PathLaplaceApproximation(
        start[global_index] if global_index else None,
        modes,
        factors,
        -float(value.detach()),
        iterations,
    )


def _pieces(vector: Tensor, slots: list) -> list[Tensor]:
    return list(vector.split([slot.size for slot in slots]))


def _time_first(piece: Tensor, slot: Any) -> Tensor:
    """A path site's flat piece as ``(T, *batch, k)`` (scalar states get ``k = 1``)."""
    state_dims = _state_dims(slot)
    value = piece.reshape(slot.unconstrained_shape).movedim(-1 - state_dims, 0)
    return value if state_dims else value.unsqueeze(-1)


def _from_time_first(value: Tensor, slot: Any) -> Tensor:
    """The inverse of :func:`_time_first`: a flat piece of the latent vector."""
    state_dims = _state_dims(slot)
    if not state_dims:
        value = value.squeeze(-1)
    return value.movedim(0, -1 - state_dims).reshape(-1)


def _state_dims(slot: Any) -> int:
    """0 for a path of scalar states (event ``(T,)``), 1 for vectors (event ``(T, k)``)."""
    return slot.support.event_dim - 1


def _factors(
    negative_log_density: Callable[[Tensor], Tensor], mode: Tensor, slots: list
) -> dict[str, BlockBidiagonalFactor]:
    """Each path's precision factor at ``mode``, the other paths held there."""
    factors = {}
    offset = 0
    for slot in slots:
        piece = mode[offset : offset + slot.size]

        def site_density(value: Tensor, offset: int = offset, slot: Any = slot) -> Tensor:
            flat = _from_time_first(value, slot)
            return negative_log_density(
                torch.cat((mode[:offset], flat, mode[offset + slot.size :]))
            )

        diagonal, below = block_tridiagonal_hessian(site_density, _time_first(piece, slot))
        factors[slot.name] = BlockBidiagonalFactor.from_blocks(diagonal, below)
        offset += slot.size
    return factors


def _path_priors(model: Callable, guide: Any, latent: Tensor, args: tuple, kwargs: dict) -> dict:
    """Each path site's prior (its ``GaussianPath``) with the globals of ``latent``."""
    values = guide._constrain(latent)
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    return {slot.name: trace.nodes[slot.name]["fn"] for slot in guide._slots}


@torch.no_grad()
def _set_residual(
    residual: PathResidual, prior: Any, mode: Tensor, factor: BlockBidiagonalFactor
) -> None:
    """The residual's own parameters (its network reads nothing yet) such that the corrected
    step is the chain of ``factor`` about ``mode`` (module docstring)."""
    vector_state = residual.lower is not None
    by_time = mode.movedim(-prior.event_dim, 0).detach().requires_grad_()  # (T, *batch, *state)
    with torch.enable_grad():
        prior_loc, prior_scale = prior.prior_moments(by_time.movedim(0, -prior.event_dim))
        # row t - 1 of the gradient is J_t: the step to t reads only the state before it
        jacobian = step_jacobian(prior_loc[1:], by_time, vector_state)[:-1]
    prior_loc, prior_scale, by_time = prior_loc.detach(), prior_scale.detach(), by_time.detach()
    states = by_time if vector_state else by_time.unsqueeze(-1)
    if not vector_state:
        jacobian = jacobian.unsqueeze(-1).unsqueeze(-1)
        prior_loc, prior_scale = prior_loc.unsqueeze(-1), prior_scale.unsqueeze(-1)
    noise_factor, gains = factor.scales, factor.gains
    identity = torch.eye(states.shape[-1]).to(states)
    mix = torch.zeros_like(gains)
    mix[1:] = gains[1:] @ torch.linalg.pinv(jacobian) - identity
    low, high = MIX_BOUNDS
    margin = 1e-3 * (high - low)
    mix = mix.clamp(low + margin, high - margin)
    reference = residual.reference if vector_state else residual.reference.unsqueeze(-1)
    departure = (mix @ (prior_loc - reference).unsqueeze(-1)).squeeze(-1)
    shift = (states - prior_loc - departure) / prior_scale
    spread = noise_factor.diagonal(dim1=-2, dim2=-1)
    log_scale = (spread / prior_scale).log()
    if vector_state:
        residual.mix.copy_(bounded_mix_inverse(mix))
        residual.lower.copy_((noise_factor / spread.unsqueeze(-2)).tril(-1))
    else:
        residual.mix.copy_(bounded_mix_inverse(mix[..., 0, 0]))
        shift, log_scale = shift.squeeze(-1), log_scale.squeeze(-1)
    residual.shift.copy_(shift)
    residual.log_scale.copy_(log_scale)
