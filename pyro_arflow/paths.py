r"""A latent Gaussian autoregressive path, declared in one line, and the flow it is.

A model's path prior

.. math::

    x_0 \sim \mathcal{N}(m_0, s_0^2), \qquad
    x_t \mid x_{t-1} \sim \mathcal{N}\big(f_t(x_{t-1}),\ g_t(x_{t-1})^2\big), \quad t = 1..T-1,

(states scalars or vectors, diagonal noise) *is* the flow from white noise :math:`z` that sets
:math:`x_0 = m_0 + s_0 z_0` and :math:`x_t = f_t(x_{t-1}) + g_t(x_{t-1}) z_t`: its Jacobian
:math:`\partial x / \partial z` is block lower triangular with diagonal :math:`g_t`, so
:math:`\log p(x) = \log \mathcal{N}(z; 0, I) - \sum_t \log g_t`. Scoring a given path is one
parallel pass (every :math:`f_t, g_t` reads a known :math:`x_{t-1}`). Drawing one is a
recurrence, solved over the whole path at once by Newton's method (one iteration when the
transition is linear in the state; :mod:`pyro_arflow.recurrences`), or in :math:`T` steps
where that does not converge.

:class:`PathFlow` is that map, optionally *corrected* step by step,

.. math::

    \mu_t = f_t + g_t\, b_t + a_t\,(f_t - r_t), \qquad \sigma_t = g_t\, e^{\rho_t},

which is how the prior-structured guides of :class:`~pyro_arflow.AutoARFlow` start from the
model (with :math:`b = a = \rho = 0` it is the prior itself; :math:`a` is the step's mix of the
prior's mean and a free one, as in ASVI, Ambrogioni et al. 2021,
https://arxiv.org/abs/2002.00643).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.distributions import Independent, Normal, TorchDistribution, constraints
from pyro.distributions import TransformedDistribution as PyroTransformedDistribution
from torch import Size, Tensor

from ._checks import check_positive_int
from .cached import CachedTransform
from .recurrences import solve_markov_recurrence

__all__ = ["GaussianPath", "PathCorrection", "PathFlow"]

Transition = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``transition(x_prev, t) -> (loc, scale)``: the law of the state after ``x_prev``."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

PARALLEL_DRAW_MIN_STEPS = 64
"""Paths of at least this many states are drawn by Newton's method over the whole path;
shorter ones in ``T`` steps."""

NEWTON_MAX_ITERATIONS = 32
"""The most Newton iterations a path's draw takes (and at most ``T / 8``, at least 4, under
``solver="auto"``, so that a failed solve costs less than the ``T`` steps it falls back to)."""

SOLVERS = ("auto", "newton", "sequential")


class GaussianPath(TorchDistribution):
    r"""A Gaussian Markov path :math:`x_0, \dots, x_{T-1}` given by its first state and its step.

    Arguments:
        transition: ``transition(x_prev, t) -> (loc, scale)``, the mean and standard deviation
            of the state after ``x_prev``; the model's globals are closed over. It must
            broadcast as elementwise torch code does: ``x_prev`` has the path's batch shape
            plus the state shape, with one more leading dimension (time) when the path is
            scored in one pass; ``t``, the index of the state being drawn (1 to ``T - 1``),
            is an integer tensor that broadcasts against ``x_prev``. ``scale`` must be > 0.
        initial: the law of the first state: a ``Normal`` (scalar states) or a ``Normal``
            made ``.to_event(1)`` (states of size ``k``).
        num_steps: the number of states ``T``.

    The event shape is ``(T,)`` for scalar states and ``(T, k)`` for vectors. ``log_prob`` is
    exact and one parallel pass; ``rsample`` solves the recurrence over the whole path
    (:class:`PathFlow`; the flow form, :meth:`as_flow`, is the same map). Under Pyro's
    validation (on by default) a transition that returns a non-positive or NaN scale raises
    ``ValueError``. A path pickles when its transition does: ``functools.partial`` of a
    module-level function, not a lambda.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_arflow as af
        >>> phi, sigma = 0.9, 0.5   # a stationary AR(1) path
        >>> path = af.GaussianPath(
        ...     lambda x, t: (phi * x, torch.full_like(x, sigma)),
        ...     dist.Normal(0.0, sigma / (1 - phi**2) ** 0.5),
        ...     num_steps=50,
        ... )
        >>> x = path.rsample((4,))
        >>> x.shape, path.log_prob(x).shape
        (torch.Size([4, 50]), torch.Size([4]))
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        transition: Transition,
        initial: TorchDistribution,
        num_steps: int,
        validate_args: bool | None = None,
    ) -> None:
        if not callable(transition):
            raise ValueError(
                f"transition must be callable as transition(x_prev, t) -> (loc, scale), "
                f"got {type(transition).__name__}"
            )
        check_positive_int(num_steps, "num_steps")
        self.transition = transition
        self.initial = initial
        self.num_steps = num_steps
        self.initial_loc, self.initial_scale = _gaussian_parts(initial)
        self.state_shape = Size(initial.event_shape)
        batch_shape = Size(initial.batch_shape)
        if num_steps > 1:  # the transition's own batch (globals it closes over)
            loc, scale = self.step(self.initial_loc, torch.tensor(1))
            state_dims = len(self.state_shape)
            batch_shape = torch.broadcast_shapes(
                batch_shape,
                loc.shape[: loc.dim() - state_dims],
                scale.shape[: scale.dim() - state_dims],
            )
        super().__init__(batch_shape, Size([num_steps]) + self.state_shape, validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, 1 + len(self.state_shape))

    def step(self, x_prev: Tensor, t: Tensor, validate: bool = True) -> tuple[Tensor, Tensor]:
        """``transition(x_prev, t)`` as tensors. With ``validate``: a pair whose entries
        broadcast with ``x_prev``, and (under Pyro's validation) a scale positive everywhere;
        the sequential draw skips this per step and checks its stacked scales once."""
        result = self.transition(x_prev, t)
        if not validate:
            loc, scale = result
            return _as_tensor(loc, x_prev), _as_tensor(scale, x_prev)
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise ValueError(
                f"transition must return a pair (loc, scale), got {type(result).__name__}"
            )
        loc, scale = (_as_tensor(part, x_prev) for part in result)
        for name, part in (("loc", loc), ("scale", scale)):
            try:
                torch.broadcast_shapes(part.shape, x_prev.shape)
            except RuntimeError:
                raise ValueError(
                    f"transition returned a {name} of shape {tuple(part.shape)}, which does not "
                    f"broadcast with x_prev of shape {tuple(x_prev.shape)} (state shape "
                    f"{tuple(self.state_shape)})"
                ) from None
        self.check_scales(scale)
        return loc, scale

    def check_scales(self, scale: Tensor) -> None:
        """Under validation, ``ValueError`` unless every entry of ``scale`` is > 0."""
        if self._validate_args and not bool((scale > 0).all()):
            raise ValueError(
                "transition returned a scale with entries that are not > 0 (smallest "
                f"{scale.min().item():.3g}; NaN counts as not > 0)"
            )

    def prior_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The prior's mean and sd of every state given the one before it along the path
        ``x``, in one pass: two tensors shaped ``(T, *batch, *state)``, time first."""
        by_time = x.movedim(-self.event_dim, 0)
        first = by_time.shape[1:]
        locs = [self.initial_loc.expand(first).unsqueeze(0)]
        scales = [self.initial_scale.expand(first).unsqueeze(0)]
        if self.num_steps > 1:
            steps = torch.arange(1, self.num_steps, device=x.device)
            steps = steps.reshape((-1,) + (1,) * (by_time.dim() - 1))
            loc, scale = self.step(by_time[:-1], steps)
            locs.append(loc.expand(by_time[1:].shape))
            scales.append(scale.expand(by_time[1:].shape))
        return torch.cat(locs), torch.cat(scales)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z, log_det = PathFlow(self)._inverse_with_log_det(value)
        event_dims = 1 + len(self.state_shape)
        return -(0.5 * z.square() + _HALF_LOG_2PI).sum(tuple(range(-event_dims, 0))) - log_det

    def rsample(self, sample_shape: Size = Size()) -> Tensor:
        like = self.initial_loc
        z = torch.randn(self._extended_shape(sample_shape), dtype=like.dtype, device=like.device)
        return PathFlow(self)(z)

    def as_flow(self) -> PyroTransformedDistribution:
        """The same distribution as white noise pushed through :class:`PathFlow`."""
        like = self.initial_loc
        base = Normal(like.new_zeros(()), like.new_ones(())).expand(
            self.batch_shape + self.event_shape
        )
        return PyroTransformedDistribution(base.to_event(self.event_dim), [PathFlow(self)])

    def expand(self, batch_shape: Size, _instance=None) -> GaussianPath:
        new = self._get_checked_instance(GaussianPath, _instance)
        batch_shape = Size(batch_shape)
        new.transition = self.transition
        new.initial = self.initial.expand(batch_shape)
        new.num_steps = self.num_steps
        new.initial_loc, new.initial_scale = _gaussian_parts(new.initial)
        new.state_shape = self.state_shape
        super(GaussianPath, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    return value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=like.dtype)


def _gaussian_parts(initial: TorchDistribution) -> tuple[Tensor, Tensor]:
    """(mean, sd) of a ``Normal`` or ``Normal(...).to_event(1)``; ``ValueError`` otherwise."""
    base = initial.base_dist if isinstance(initial, Independent) else initial
    if not isinstance(base, Normal) or len(initial.event_shape) > 1:
        raise ValueError(
            "initial must be a Normal (scalar states) or Normal(...).to_event(1) (vector "
            f"states), got {type(initial).__name__} with event shape "
            f"{tuple(initial.event_shape)}"
        )
    return initial.mean, initial.stddev


@dataclass
class PathCorrection:
    r"""A step-by-step correction of a path's law, every tensor time first,
    ``(T, *batch, ...)``, broadcasting against the path's batch.

    .. math::

        \mu_t = f_t + g_t \odot b_t + A_t (f_t - r_t), \qquad
        x_t = \mu_t + (I + L_t)(g_t e^{\rho_t} \odot z_t),

    with :math:`A_t` a ``(k, k)`` matrix and :math:`L_t` strictly lower triangular for states
    of size ``k`` (scalar states: :math:`A_t` a number, no :math:`L_t`). :math:`L_t` correlates
    a step's coordinates without changing the volume: :math:`\log|\det| = \sum \log g_t +
    \rho_t`.
    """

    shift: Tensor  # b, in units of the prior's scale: (T, *batch, *state)
    mix: Tensor  # A: (T, *batch) for scalar states, (T, *batch, k, k) for vectors
    log_scale: Tensor  # rho: (T, *batch, *state)
    reference: Tensor  # r, the prior mean along a fixed path: (T, *batch, *state)
    lower: Tensor | None = None  # L (its strict lower triangle is read): (T, *batch, k, k)

    def mean(self, loc: Tensor, scale: Tensor, t: int | None) -> Tensor:
        r""":math:`\mu` at step ``t`` (``None``: every step, time first)."""
        b, a, r = (p if t is None else p[t] for p in (self.shift, self.mix, self.reference))
        departure = loc - r
        if self.lower is None:
            return loc + scale * b + a * departure
        return loc + scale * b + (a @ departure.unsqueeze(-1)).squeeze(-1)

    def mixing(self) -> Tensor | None:
        """:math:`I + L` of every step, time first, or ``None`` for scalar states."""
        if self.lower is None:
            return None
        size = self.lower.shape[-1]
        identity = torch.eye(size, dtype=self.lower.dtype, device=self.lower.device)
        return identity + self.lower.tril(-1)


class PathFlow(CachedTransform):
    r"""The path's flow, white noise :math:`z` to path :math:`x`, optionally corrected.

    ``_call`` draws, ``_inverse`` scores (one pass); ``log_abs_det_jacobian`` is
    :math:`\sum_t \log \sigma_t`, read from the last pair when it is the one just computed.

    The draw is the recurrence :math:`x_t = \mu_t(x_{t-1}) + \sigma_t(x_{t-1}) z_t`. With
    ``solver="auto"`` (the default) a path of at least :data:`PARALLEL_DRAW_MIN_STEPS` states
    is solved by Newton's method over the whole path, a few parallel passes and
    :math:`\lceil \log_2 T \rceil`-round scans (:mod:`pyro_arflow.recurrences`; one
    iteration and a check when the transition is linear), falling back to ``T`` steps when it
    does not converge in :data:`NEWTON_MAX_ITERATIONS`; ``"sequential"`` always takes ``T``
    steps, ``"newton"`` raises ``ValueError`` instead of falling back. Either way the draw is
    exact to the floats' precision and its gradients are the exact solution's.

    Arguments:
        path: the :class:`GaussianPath` whose transition and first state it follows.
        correction: a :class:`PathCorrection`, or ``None`` for the prior's own flow.
        solver: ``"auto"``, ``"newton"`` or ``"sequential"``.
    """

    bijective = True
    sign = +1

    def __init__(
        self,
        path: GaussianPath,
        correction: PathCorrection | None = None,
        cache_size: int = 1,
        solver: str = "auto",
    ) -> None:
        super().__init__(cache_size=cache_size)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.path = path
        self.correction = correction
        self.solver = solver
        self._event_dims = path.event_dim

    @property
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self._event_dims)

    @property
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self._event_dims)

    def _call_with_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The draw: by Newton's method over the whole path when it is long enough and
        converges (:func:`~pyro_arflow.recurrences.solve_markov_recurrence`), else ``T``
        steps."""
        long_enough = self.path.num_steps >= PARALLEL_DRAW_MIN_STEPS
        if self.solver == "newton" or (self.solver == "auto" and long_enough):
            drawn = self._draw_by_newton(z)
            if drawn is not None:
                return drawn
            if self.solver == "newton":
                raise ValueError(
                    f"the path's Newton solve did not converge in {NEWTON_MAX_ITERATIONS} "
                    "iterations (a chaotic transition's linearization grows without bound "
                    "over a long path); draw it with solver='auto', which falls back to T steps"
                )
        return self._draw_sequentially(z)

    def _draw_by_newton(self, z: Tensor) -> tuple[Tensor, Tensor] | None:
        """The draw and its log-determinant, or ``None`` when Newton's method did not
        converge."""
        path, correction = self.path, self.correction
        state_dims = len(path.state_shape)
        noise = z.movedim(-self._event_dims, 0)  # (T, *batch, *state)
        shape = noise.shape
        steps = torch.arange(1, path.num_steps, device=z.device)
        steps = steps.reshape((-1,) + (1,) * (len(shape) - 1))
        mixing = None
        if correction is not None:
            noise = noise * correction.log_scale.exp()
            mixing = correction.mixing()

        def states(loc: Tensor, scale: Tensor, t: slice) -> Tensor:
            """The states at times ``t`` after the prior's moments there."""
            innovation = scale * noise[t]
            if correction is None:
                return loc + innovation
            if mixing is not None:
                innovation = (mixing[t] @ innovation.unsqueeze(-1)).squeeze(-1)
            return correction.mean(loc, scale, t) + innovation

        def step(previous: Tensor) -> tuple[Tensor, Tensor]:
            loc, scale = path.step(previous, steps, validate=False)
            scale = scale.expand(previous.shape)
            return states(loc.expand(previous.shape), scale, slice(1, None)), scale

        first_loc = path.initial_loc.expand(shape[1:]).unsqueeze(0)
        first_scale = path.initial_scale.expand(shape[1:]).unsqueeze(0)
        first = states(first_loc, first_scale, slice(0, 1))[0]
        guess = path.initial_loc if correction is None else correction.reference
        solved = solve_markov_recurrence(
            step,
            first,
            guess.expand(shape),
            vector_state=bool(state_dims),
            max_iterations=(
                NEWTON_MAX_ITERATIONS
                if self.solver == "newton"
                else min(NEWTON_MAX_ITERATIONS, max(4, path.num_steps // 8))
            ),
        )
        if solved is None:
            return None
        x, later_scales, _ = solved
        prior_scales = torch.cat((first_scale, later_scales))
        path.check_scales(prior_scales)
        batch = shape[1 : len(shape) - state_dims]
        return x.movedim(0, -self._event_dims), self._log_det_of(prior_scales, batch)

    def _draw_sequentially(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The draw in ``T`` steps, each the transition and a few fused multiply-adds; the
        scales are validated and logged once, after the loop."""
        path, time_dim = self.path, -self._event_dims
        batch = z.shape[: z.dim() - self._event_dims]
        state = path.state_shape
        correction = self.correction
        noise = z.unbind(time_dim)
        if correction is not None:
            # every step's coefficients at once: mean = (1 + A) f + (-A r) + g b, and the
            # noise already scaled by e^rho (scalar states: a step is two fused multiply-adds)
            gained = (z.movedim(time_dim, 0) * correction.log_scale.exp()).unbind(0)
            shifts = correction.shift.unbind(0)
            if correction.lower is None:
                gains = (1 + correction.mix).unbind(0)
                offsets = (-correction.mix * correction.reference).unbind(0)
            else:
                mixings = correction.mixing().unbind(0)
        steps = torch.arange(path.num_steps, device=z.device).unbind(0)
        states, scales = [], []
        loc = path.initial_loc.expand(batch + state)
        scale = path.initial_scale.expand(batch + state)
        for t in range(path.num_steps):
            if t > 0:
                loc, scale = path.step(states[-1], steps[t], validate=False)
            scales.append(scale)
            if correction is None:
                states.append(torch.addcmul(loc, scale, noise[t]))
            elif correction.lower is None:
                mean = torch.addcmul(torch.addcmul(offsets[t], gains[t], loc), scale, shifts[t])
                states.append(torch.addcmul(mean, scale, gained[t]))
            else:
                innovation = (mixings[t] @ (scale * gained[t]).unsqueeze(-1)).squeeze(-1)
                states.append(correction.mean(loc, scale, t) + innovation)
        scales = [scale.expand(batch + state) for scale in scales]
        prior_scales = torch.stack(scales)  # (T, *batch, *state)
        path.check_scales(prior_scales)
        return torch.stack(states, dim=time_dim), self._log_det_of(prior_scales, batch)

    def _inverse_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale = self.path.prior_moments(x)
        by_time = x.movedim(-self._event_dims, 0)
        if self.correction is None:
            noise = (by_time - loc) / scale
        else:
            innovation = by_time - self.correction.mean(loc, scale, None)
            mixing = self.correction.mixing()
            if mixing is not None:
                innovation = torch.linalg.solve_triangular(
                    mixing, innovation.unsqueeze(-1), upper=False, unitriangular=True
                ).squeeze(-1)
            noise = innovation / (scale * self.correction.log_scale.exp())
        z = noise.movedim(0, -self._event_dims)
        return z, self._log_det_of(scale, x.shape[: x.dim() - self._event_dims])

    def _log_det_of(self, prior_scales: Tensor, batch: Size) -> Tensor:
        r""":math:`\sum_t \log \sigma_t` from the prior's scales along a path (time first):
        the correction's log scales added, summed over time and state, one per batch member."""
        log_sd = prior_scales.log()
        if self.correction is not None:
            log_sd = log_sd + self.correction.log_scale
        return _sum_state(log_sd, len(self.path.state_shape)).sum(0).expand(batch)

    def _log_det(self, z: Tensor, x: Tensor) -> Tensor:
        return self._inverse_with_log_det(x)[1]


def _sum_state(value: Tensor, state_dims: int) -> Tensor:
    return value.sum(tuple(range(-state_dims, 0))) if state_dims else value
