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

The same approximation at *every* draw of the globals is :func:`conditional_laplace`
(``AutoARFlow(model, paths="laplace")``): one Newton step per draw from a fixed
linearization path (the warm start's mode), differentiable in the globals, so the guide's
law of a linear-Gaussian path given any globals is the exact conditional posterior (INLA's
Gaussian conditional, Rue, Martino and Chopin 2009) and the flow over the globals fits their
marginal posterior; the learned residual adds to it. The backward sweep is a
:math:`\lceil \log_2 T \rceil`-round scan (of Möbius maps for scalar states, of Schur
complements for blocks), and the solves are linear recurrences
(:func:`~pyro_arflow.recurrences.linear_recurrence`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from torch import Tensor

from ._laplace import (
    NEWTON_STEPS,
    NOT_POSITIVE_DEFINITE,
    find_mode,
    log_density,
    reversed_cholesky_ex,
)
from ._params import module_context
from .recurrences import linear_recurrence, step_jacobian
from .structured import (
    MIX_BOUNDS,
    PathResidual,
    ResidualParts,
    bounded_mix_inverse,
    global_positions,
)

__all__ = [
    "BlockBidiagonalFactor",
    "PathLaplaceApproximation",
    "block_tridiagonal_hessian",
    "chain_parameters",
    "conditional_laplace",
]

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
        :math:`F_t = C_t^{-\top} H_{t, t-1}`, taken in :math:`\lceil \log_2 T \rceil` parallel
        rounds (:func:`_scalar_pivots` for scalar states, :func:`_block_pivots` for blocks).
        ``ValueError`` unless ``H`` is positive definite."""
        factor, positive = cls.from_blocks_ex(diagonal, below)
        if not bool(positive.all()):
            raise ValueError(NOT_POSITIVE_DEFINITE)
        return factor

    @classmethod
    def from_blocks_ex(
        cls, diagonal: Tensor, below: Tensor
    ) -> tuple[BlockBidiagonalFactor, Tensor]:
        """:meth:`from_blocks` and, per batch member, whether its precision is positive
        definite (where it is not, the factor is finite and meaningless)."""
        if diagonal.shape[-1] == 1:
            pivots = _scalar_pivots(diagonal[..., 0, 0], below[..., 0, 0])
            positive = ((pivots > 0) & torch.isfinite(pivots)).all(0)
            roots = torch.where(positive, pivots, 1).sqrt()[..., None, None]
            below = torch.cat((torch.zeros_like(below[:1]), below[1:] / roots[1:]))
            return cls(roots, below), positive
        pivots, eliminated = _block_pivots(diagonal, below)
        blocks, positive = reversed_cholesky_ex(pivots)
        positive = positive.all(0) & eliminated
        belows = torch.linalg.solve_triangular(blocks[1:].mT, below[1:], upper=True, left=True)
        return cls(blocks, torch.cat((torch.zeros_like(below[:1]), belows))), positive

    @property
    def scales(self) -> Tensor:
        """:math:`S_t = C_t^{-1}`: the chain's noise factor at every step (lower triangular)."""
        if self.diagonal.shape[-1] == 1:
            return self.diagonal.reciprocal()
        identity = torch.eye(self.diagonal.shape[-1]).to(self.diagonal)
        return torch.linalg.solve_triangular(self.diagonal, identity, upper=False)

    @property
    def gains(self) -> Tensor:
        """:math:`M_t = -C_t^{-1} F_t`: how the chain's mean at step ``t`` follows the state
        before (:math:`M_0 = 0`)."""
        if self.diagonal.shape[-1] == 1:
            return -self.below / self.diagonal
        return -torch.linalg.solve_triangular(self.diagonal, self.below, upper=False)

    def solve(self, rhs: Tensor) -> Tensor:
        r""":math:`H^{-1} g` for ``rhs`` :math:`g` shaped ``(T, *batch, k)``: :math:`A^\top w =
        g` backward in time, :math:`w_t = S_t^\top (g_t - F_{t+1}^\top w_{t+1})`, then
        :math:`A d = w` forward, :math:`d_t = M_t d_{t-1} + S_t w_t`; each a linear recurrence
        solved by :func:`~pyro_arflow.recurrences.linear_recurrence`."""
        scales, below, gains = self.scales, self.below, self.gains
        if rhs.shape[-1] == 1:  # 1 x 1 blocks: the same recurrences, elementwise
            scales, below, gains = scales[..., 0], below[..., 0], gains[..., 0]
            backward = -below[1:] * scales[:-1]  # maps w_{t+1} to w_t, t = 0 .. T-2
            w = linear_recurrence(backward.flip(0), (scales * rhs).flip(0)).flip(0)
            return linear_recurrence(gains[1:], scales * w)
        backward = -(below[1:] @ scales[:-1]).mT
        offsets = (scales.mT @ rhs.unsqueeze(-1)).squeeze(-1)
        w = linear_recurrence(backward.flip(0), offsets.flip(0), matrix=True).flip(0)
        return linear_recurrence(gains[1:], (scales @ w.unsqueeze(-1)).squeeze(-1), matrix=True)


def _scalar_pivots(diagonal: Tensor, below: Tensor) -> Tensor:
    r"""The backward sweep of a tridiagonal precision (scalar states), :math:`r_{T-1} =
    H_{T-1,T-1}` and :math:`r_t = H_{tt} - H_{t+1,t}^2 / r_{t+1}` (so :math:`C_t =
    \sqrt{r_t}`), in :math:`\lceil \log_2 T \rceil` rounds: each step is the Möbius map
    :math:`r \mapsto (H_{tt} r - H_{t+1,t}^2) / r`, the matrix
    :math:`\begin{pmatrix} H_{tt} & -H_{t+1,t}^2 \\ 1 & 0 \end{pmatrix}` acting on
    :math:`(r, 1)` up to scale, and matrix products compose them (an inclusive scan, each
    product rescaled to its largest entry: the ratio does not see the scale). ``diagonal``
    and ``below`` are ``(T, *batch)``; ``below[0]`` is ignored."""
    num_steps = len(diagonal)
    coupling = torch.cat((below[1:].square(), torch.zeros_like(below[:1])))  # to the state after
    maps = torch.stack(
        (
            torch.stack((diagonal, -coupling), dim=-1),
            torch.stack((torch.ones_like(diagonal), torch.zeros_like(diagonal)), dim=-1),
        ),
        dim=-2,
    ).flip(0)  # reversed time: element u composes the maps of times T-1-u .. T-1
    shift = 1
    while shift < num_steps:
        combined = maps[shift:] @ maps[:-shift]
        combined = combined / combined.detach().abs().amax((-2, -1), keepdim=True)
        maps = torch.cat((maps[:shift], combined))
        shift *= 2
    ends = maps.sum(-1)  # each composition applied to (1, 1): the last map ignores its input
    return (ends[..., 0] / ends[..., 1]).flip(0)


def _block_pivots(diagonal: Tensor, below: Tensor) -> tuple[Tensor, Tensor]:
    r"""The backward sweep of a block tridiagonal precision, :math:`R_{T-1} = H_{T-1,T-1}` and
    :math:`R_t = H_{tt} - H_{t+1,t}^\top R_{t+1}^{-1} H_{t+1,t}` (so :math:`C_t^\top C_t =
    R_t`), in :math:`\lceil \log_2 T \rceil` rounds. Step :math:`t` is the quadratic form
    :math:`x_t^\top H_{tt} x_t + 2 x_t^\top H_{t+1,t}^\top x_{t+1}` of its first and next
    state, held as the blocks :math:`(P, Q, E)` of :math:`a^\top P a + 2 a^\top Q b + b^\top E
    b`. Two adjacent segments compose by eliminating the state they share (Gaussian
    marginalization, so associative): with :math:`M = E_1 + P_2`,

    .. math::

        P = P_1 - Q_1 M^{-1} Q_1^\top, \quad Q = -Q_1 M^{-1} Q_2, \quad
        E = E_2 - Q_2^\top M^{-1} Q_2,

    and the composition of steps :math:`t .. T-1` is :math:`(R_t, 0, 0)` (an inclusive scan
    in reversed time). :math:`M` is a Schur complement of a principal block of :math:`H`:
    positive definite when :math:`H` is. Returns the pivots ``(T, *batch, k, k)`` and, per
    batch member, whether every :math:`M` was positive definite (where one was not, it is
    taken as the identity and the pivots are finite and meaningless)."""
    num_steps = len(diagonal)
    first = diagonal.flip(0)  # reversed time: element u composes the steps T-1-u .. T-1
    cross = torch.cat((below[1:].mT, torch.zeros_like(below[:1]))).flip(0)
    last = torch.zeros_like(first)
    eliminated = torch.ones(diagonal.shape[1:-2], dtype=torch.bool, device=diagonal.device)
    identity = torch.eye(diagonal.shape[-1], dtype=diagonal.dtype, device=diagonal.device)
    shift = 1
    while shift < num_steps:
        # segment u (steps T-1-u ..) comes first, segment u - shift (further on) second
        shared = last[shift:] + first[:-shift]
        fine = torch.linalg.cholesky_ex(shared).info == 0
        eliminated = eliminated & fine.all(0)
        # the inverse of a k x k block: for small k, cheaper than a Cholesky solve
        inverse = torch.linalg.inv_ex(torch.where(fine[..., None, None], shared, identity))[0]
        to_first, to_last = inverse @ cross[shift:].mT, inverse @ cross[:-shift]
        composed_first = first[shift:] - cross[shift:] @ to_first
        composed_last = last[:-shift] - cross[:-shift].mT @ to_last
        first = torch.cat((first[:shift], (composed_first + composed_first.mT) / 2))
        last = torch.cat((last[:shift], (composed_last + composed_last.mT) / 2))
        cross = torch.cat((cross[:shift], -cross[shift:] @ to_last))
        shift *= 2
    return first.flip(0), eliminated


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
    _, diagonal, below = gradient_and_blocks(negative_log_density, path)
    return diagonal.detach(), below.detach()


def gradient_and_blocks(
    negative_log_density: Callable[[Tensor], Tensor],
    path: Tensor,
    differentiable: bool = False,
    check: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient at ``path`` and the Hessian's blocks as :func:`block_tridiagonal_hessian`
    reads them. ``differentiable``: all three stay functions of whatever else the density reads
    (the globals, for the per-draw Laplace); ``check``: the random probe's check."""
    point = path.detach().requires_grad_()
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(negative_log_density(point), point, create_graph=True)

    def product(probe: Tensor) -> Tensor:
        (result,) = torch.autograd.grad(
            gradient, point, probe, retain_graph=True, create_graph=differentiable
        )
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
    if check:
        probe = torch.randn_like(path)
        exact = product(probe).detach()
        column = probe.unsqueeze(-1)
        read = (diagonal.detach() @ column).squeeze(-1)
        read[1:] += (below[1:].detach() @ column[:-1]).squeeze(-1)
        read[:-1] += (below[1:].detach().mT @ column[1:]).squeeze(-1)
        if float((read - exact).norm()) > COUPLING_TOLERANCE * float(exact.norm()):
            raise ValueError(
                "the model's log density couples a path's states further apart than "
                "neighbours (or one path's batch members with each other): its Hessian is not "
                "block tridiagonal in time, which the paths' Laplace approximation needs"
            )
    return gradient if differentiable else gradient.detach(), diagonal, below


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
    if guide.paths[0].linearization is not None:  # paths="laplace": each draw's own Laplace
        with torch.no_grad():
            for slot, residual in zip(path_slots, guide.paths, strict=True):
                residual.linearization.copy_(modes[slot.name])
    else:
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
    return _by_time(piece.reshape(slot.unconstrained_shape), _state_dims(slot))


def _from_time_first(value: Tensor, slot: Any) -> Tensor:
    """The inverse of :func:`_time_first`: a flat piece of the latent vector."""
    return _site_shaped(value, _state_dims(slot)).reshape(-1)


def _by_time(value: Tensor, state_dims: int) -> Tensor:
    """A path's value (``(*batch, T, *state)``) as ``(T, *batch, k)``."""
    value = value.movedim(-1 - state_dims, 0)
    return value if state_dims else value.unsqueeze(-1)


def _site_shaped(value: Tensor, state_dims: int) -> Tensor:
    """The inverse of :func:`_by_time`."""
    if not state_dims:
        value = value.squeeze(-1)
    return value.movedim(0, -1 - state_dims)


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
    parts = chain_parameters(prior, mode, factor, residual.reference)
    for name, value in parts.items():
        getattr(residual, name).copy_(value)


def chain_parameters(
    prior: Any,
    mean: Tensor,
    factor: BlockBidiagonalFactor,
    reference: Tensor,
    differentiable: bool = False,
) -> ResidualParts:
    """A path residual's free parameters (time first, with any batch of ``mean``) whose
    corrected step is the chain of ``factor`` about ``mean`` (module docstring), the mix
    clipped to :data:`~pyro_arflow.structured.MIX_BOUNDS`. ``differentiable``: functions of
    whatever ``mean``, ``factor`` and the prior read; else detached."""
    vector_state = len(prior.state_shape) == 1
    by_time = mean.movedim(-prior.event_dim, 0)  # (T, *batch, *state)
    if not by_time.requires_grad:
        by_time = by_time.detach().requires_grad_()
    with torch.enable_grad():
        prior_loc, prior_scale = prior.prior_moments(by_time.movedim(0, -prior.event_dim))
        # row t - 1 of the gradient is J_t: the step to t reads only the state before it
        jacobian = step_jacobian(prior_loc[1:], by_time, vector_state, differentiable)[:-1]
    if not differentiable:
        prior_loc, prior_scale, by_time = prior_loc.detach(), prior_scale.detach(), by_time.detach()
    states = by_time if vector_state else by_time.unsqueeze(-1)
    if not vector_state:
        jacobian = jacobian.unsqueeze(-1).unsqueeze(-1)
        prior_loc, prior_scale = prior_loc.unsqueeze(-1), prior_scale.unsqueeze(-1)
        reference = reference.unsqueeze(-1)
    noise_factor, gains = factor.scales, factor.gains
    identity = torch.eye(states.shape[-1]).to(states)
    later = gains[1:] @ _pseudo_inverse(jacobian) - identity
    mix = torch.cat((torch.zeros_like(later[:1]), later))
    low, high = MIX_BOUNDS
    margin = 1e-3 * (high - low)
    mix = mix.clamp(low + margin, high - margin)
    departure = (mix @ (prior_loc - reference).unsqueeze(-1)).squeeze(-1)
    shift = (states - prior_loc - departure) / prior_scale
    spread = noise_factor.diagonal(dim1=-2, dim2=-1)
    log_scale = (spread / prior_scale).log()
    if vector_state:
        lower = (noise_factor / spread.unsqueeze(-2)).tril(-1)
        return ResidualParts(shift, log_scale, bounded_mix_inverse(mix), lower)
    free_mix = bounded_mix_inverse(mix[..., 0, 0])
    return ResidualParts(shift.squeeze(-1), log_scale.squeeze(-1), free_mix)


def _gershgorin_lift(diagonal: Tensor, below: Tensor) -> Tensor:
    r"""Diagonal blocks raised just enough that each dominates its block row: the smallest
    eigenvalue of :math:`H_{tt}` past the norms of :math:`H_{t,t-1}` and :math:`H_{t+1,t}`
    (by a thousandth of their sum and its own size), which makes the block tridiagonal matrix
    positive definite (block Gershgorin); rows that already dominate are left as they are."""
    coupling = torch.linalg.matrix_norm(below)  # Frobenius, at least the spectral norm
    coupling = torch.cat((torch.zeros_like(coupling[:1]), coupling[1:]))
    radius = coupling + torch.cat((coupling[1:], torch.zeros_like(coupling[:1])))
    lowest = torch.linalg.eigvalsh(diagonal)[..., 0]
    margin = 1e-3 * (radius + lowest.abs())
    lift = (radius + margin - lowest).clamp(min=0)
    identity = torch.eye(diagonal.shape[-1], dtype=diagonal.dtype, device=diagonal.device)
    return diagonal + lift[..., None, None] * identity


def _pseudo_inverse(matrices: Tensor) -> Tensor:
    """The pseudo-inverse of each ``(k, k)`` matrix; for ``k = 1`` a reciprocal (0 for 0),
    without the SVD."""
    if matrices.shape[-1] > 1:
        return torch.linalg.pinv(matrices)
    nonzero = matrices != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, matrices, 1), 0)


def conditional_laplace(
    model: Callable,
    args: tuple,
    kwargs: dict,
    residuals: dict[str, PathResidual],
    global_values: dict[str, Tensor],
    batch: torch.Size,
    check: bool = False,
) -> dict[str, ResidualParts]:
    r"""Per draw of the globals, each path's Laplace approximation given them, as the free
    parameters of its residual (``paths="laplace"`` of :class:`~pyro_arflow.AutoARFlow`).

    For each path, at its linearization path :math:`\bar x` (the others held at theirs):
    the gradient :math:`g` and block tridiagonal Hessian :math:`H` of
    :math:`-\log p(x, y \mid \theta)`, one Newton step :math:`\hat x = \bar x - H^{-1} g`,
    and the chain of :math:`H`'s factor about :math:`\hat x` (:func:`chain_parameters`). For a
    linear-Gaussian path this is the exact conditional posterior at every :math:`\theta`
    (INLA's Gaussian conditional, Rue, Martino and Chopin 2009); for a nonlinear one, its
    Gaussian approximation about :math:`\bar x`. A draw whose :math:`H` is not positive
    definite takes :math:`H` with its diagonal blocks raised until each dominates its row
    (block Gershgorin), for the factor and the Newton step alike; the other draws do
    not see it. Differentiable in the globals when gradients are on.

    Arguments:
        residuals: each path site's residual, whose ``linearization`` is :math:`\bar x`.
        global_values: the globals' constrained values, with the draws' ``batch`` dims.
        batch: the draws' batch shape.
        check: check that each Hessian is block tridiagonal (``ValueError`` if not), as
            :func:`block_tridiagonal_hessian` does; the guide does so once, when built.
    """
    differentiable = torch.is_grad_enabled()
    held = {
        name: residual.linearization.expand(batch + residual.linearization.shape)
        for name, residual in residuals.items()
    }
    parts = {}
    priors: dict[str, Any] = {}  # each path's prior (its GaussianPath) with these globals
    for name, residual in residuals.items():
        state_dims = int(residual.lower is not None)

        def negative_log_density(
            time_first: Tensor, name: str = name, state_dims: int = state_dims
        ) -> Tensor:
            data = {**global_values, **held, name: _site_shaped(time_first, state_dims)}
            with poutine.block():
                trace = poutine.trace(poutine.condition(model, data=data)).get_trace(
                    *args, **kwargs
                )
            priors[name] = trace.nodes[name]["fn"]
            return -trace.log_prob_sum()

        point = _by_time(held[name], state_dims)
        with torch.enable_grad():
            gradient, diagonal, below = gradient_and_blocks(
                negative_log_density, point, differentiable, check
            )
            factor, positive = BlockBidiagonalFactor.from_blocks_ex(diagonal, below)
            if not bool(positive.all()):  # those draws take a positive-definite stand-in
                lifted = _gershgorin_lift(diagonal, below)
                diagonal = torch.where(positive[None, ..., None, None], diagonal, lifted)
                factor = BlockBidiagonalFactor.from_blocks(diagonal, below)
            mean = _site_shaped(point - factor.solve(gradient), state_dims)
            reference = residual.reference
            reference = reference.view(
                reference.shape[:1] + (1,) * len(batch) + reference.shape[1:]
            )
            parts[name] = chain_parameters(priors[name], mean, factor, reference, differentiable)
    return parts
