r"""Prior-structured guides: each latent path follows its prior's flow, corrected by a residual.

For a model with globals :math:`\theta` and :class:`~pyro_arflow.GaussianPath` sites
:math:`x`, the guide is :math:`q(\theta)\, q(x \mid \theta)`:

- :math:`\theta` (every latent that is not a path, unconstrained and concatenated) is drawn
  by a flow, as :class:`~pyro_arflow.AutoARFlow` draws a whole latent vector;
- the model is then run (hidden from every outer handler) with those globals, so each path
  site's prior is the model's own, closed over the sampled :math:`\theta`; the path is drawn
  by that prior's flow, corrected step by step (:class:`~pyro_arflow.paths.PathCorrection`):

.. math::

    x_t = f_t + g_t\, b_t + A_t (f_t - r_t) + (I + L_t)(g_t\, e^{\rho_t} z_t),
    \qquad (b, A, \rho, L)_t = (b, A, \rho, L)^0_t + W(\theta - \theta_0)_t,

where :math:`(f_t, g_t)` is the prior's transition at the guide's own :math:`x_{t-1}`,
:math:`A_t` a mix bounded in :data:`MIX_BOUNDS` (a matrix for vector states), :math:`L_t` a
strictly lower triangular mixing within a step (vector states),
:math:`r` the prior's noise-free path at the initial globals :math:`\theta_0`, and :math:`W` a
small network (one ``tanh`` layer). The residual reads the globals (the context), so the path
widens and narrows with them, and :math:`g_t` already does: the funnel between a path and its
scale is built in. Every correction starts at zero, so as built the guide's law of the path
given the globals is the prior's; ``init_loc_fn`` places the globals, and the Laplace warm
start (:mod:`pyro_arflow.path_laplace`, ``fit``'s default) sets the corrections to each path's
Laplace approximation given them. With ``paths="laplace"`` the corrections add to each draw's
own Laplace approximation (``StructuredTransform``'s ``path_bases``;
:func:`~pyro_arflow.path_laplace.conditional_laplace`), which for a linear-Gaussian path is
the exact conditional at every :math:`\theta`, not at :math:`\theta_0` alone. This is the
ASVI family of Ambrogioni et al. 2021 (https://arxiv.org/abs/2002.00643) as a flow, with the
globals first.
Given the globals, it holds the exact posterior of a linear-Gaussian path (its conditionals
are Gaussian, with means linear in the previous state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import Transform, biject_to, constraints

from .cached import CachedTransform
from .paths import GaussianPath, PathCorrection, PathFlow

__all__ = ["PathResidual", "ResidualParts", "SiteSlot", "StructuredTransform", "global_positions"]


@dataclass
class ResidualParts:
    r"""The free parameters of a path's correction, time first (``(T, *batch, *state)``; the
    mix ``(T, *batch)`` for scalar states, ``(T, *batch, k, k)`` for vectors): the shift
    :math:`b`, the log scale :math:`\rho`, the mix before :func:`bounded_mix`, and for vector
    states the within-step mixing :math:`L`."""

    shift: Tensor
    log_scale: Tensor
    mix: Tensor
    lower: Tensor | None = None

    def items(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) of each part there is, in the order of a residual's parameters."""
        names = ("shift", "log_scale", "mix", "lower")
        return [(name, getattr(self, name)) for name in names if getattr(self, name) is not None]


class PathResidual(nn.Module):
    r"""The learned correction of one path site (:class:`~pyro_arflow.paths.PathCorrection`):
    per step a shift :math:`b`, a log scale :math:`\rho`, a mix :math:`A` (a ``(k, k)`` matrix
    for states of size ``k``) and, for vector states, the within-step mixing :math:`L`; each
    plus what a small network reads from the globals.

    Arguments:
        reference: :math:`r`, the prior's noise-free path at the initial globals, shaped
            ``(T, *site_batch, *state)`` (time first).
        vector_state: whether the states are vectors (the last dimension of ``reference``).
        context_origin: the unconstrained globals :math:`\theta_0` at initialization
            (``None`` when the model has no globals).
        hidden_dim: width of the ``tanh`` layer through which the residual reads
            :math:`\theta - \theta_0`; 0 reads it linearly.
        linearized: keep a ``linearization`` path (shaped as the site; the prior's
            noise-free one until a warm start moves it to the mode), about which each draw's
            Laplace approximation is taken (``paths="laplace"``; its parts come in as
            ``base``).

    Every correction starts at zero (the network's output layer too), so the guide's law of
    the path starts as the prior's (as the per-draw Laplace approximation, when linearized).
    """

    reference: Tensor
    context_origin: Tensor
    linearization: Tensor | None

    def __init__(
        self,
        reference: Tensor,
        vector_state: bool,
        context_origin: Tensor | None,
        hidden_dim: int = 16,
        linearized: bool = False,
    ) -> None:
        super().__init__()
        matrix = reference.shape + reference.shape[-1:] if vector_state else reference.shape
        self.shift = nn.Parameter(torch.zeros_like(reference))
        self.log_scale = nn.Parameter(torch.zeros_like(reference))
        self.mix = nn.Parameter(reference.new_zeros(matrix))
        self.lower = nn.Parameter(reference.new_zeros(matrix)) if vector_state else None
        self.register_buffer("reference", reference.detach().clone())
        site_shaped = reference.detach().movedim(0, -2 if vector_state else -1).clone()
        self.register_buffer("linearization", site_shaped if linearized else None)
        self.context_net: nn.Module | None = None
        if context_origin is not None:
            self.register_buffer("context_origin", context_origin.detach().clone())
            context_dim = len(context_origin)
            outputs = sum(part.numel() for part in self._parts())
            output = nn.Linear(hidden_dim or context_dim, outputs, bias=False)
            nn.init.zeros_(output.weight)
            layers = [nn.Linear(context_dim, hidden_dim), nn.Tanh()] if hidden_dim else []
            self.context_net = nn.Sequential(*layers, output).to(reference)

    def _parts(self) -> list[Tensor]:
        """The residual's own free parameters, in :class:`ResidualParts`' order."""
        own = ResidualParts(self.shift, self.log_scale, self.mix, self.lower)
        return [part for _, part in own.items()]

    def correction(
        self, context: Tensor | None, batch_dims: int, base: ResidualParts | None = None
    ) -> PathCorrection:
        """The correction for globals ``context`` (shaped ``(*batch, C)``), every tensor time
        first with ``batch`` (``batch_dims`` dimensions) after time; ``base``: free parts
        the residual's own add to (each draw's Laplace approximation)."""

        def spread(part: Tensor) -> Tensor:
            return part.view(part.shape[:1] + (1,) * batch_dims + part.shape[1:])

        parts = [spread(part) for part in self._parts()]
        if base is not None:
            parts = [part + offset for part, (_, offset) in zip(parts, base.items(), strict=True)]
        if self.context_net is not None and context is not None:
            offsets = self.context_net(context - self.context_origin)
            sizes = [part.numel() for part in self._parts()]
            for index, (offset, part) in enumerate(
                zip(offsets.split(sizes, dim=-1), self._parts(), strict=True)
            ):
                offset = offset.view(context.shape[:-1] + part.shape).movedim(batch_dims, 0)
                parts[index] = parts[index] + offset
        total = ResidualParts(*parts)
        return PathCorrection(
            total.shift,
            bounded_mix(total.mix),
            total.log_scale,
            spread(self.reference),
            total.lower,
        )


MIX_BOUNDS = (-1.0, 0.1)
"""The corrected step's mix :math:`A` lies in this range (entrywise)."""


def bounded_mix(raw: Tensor) -> Tensor:
    r"""The mix from its free parameter: ``tanh`` squashed into :data:`MIX_BOUNDS`, with slope 1
    at 0. The corrected mean reads :math:`(1 + A) f_t`: it may shrink the prior's dependence on
    the previous state, as a posterior does, or strengthen it by at most 10%, so a stable prior
    recursion stays nearly stable. (Unbounded, the mix made a 500-step volatility path explode
    within 150 Adam steps at lr 1e-2.)"""
    low, high = MIX_BOUNDS
    return torch.where(raw < 0, -low * torch.tanh(raw), high * torch.tanh(raw / high))


def bounded_mix_inverse(mix: Tensor) -> Tensor:
    """The free parameter of a mix strictly inside :data:`MIX_BOUNDS` (:func:`bounded_mix`'s
    inverse)."""
    low, high = MIX_BOUNDS
    return torch.where(mix < 0, torch.atanh(mix / -low), high * torch.atanh(mix / high))


@dataclass(frozen=True)
class SiteSlot:
    """Where one latent site lies: in the latent vector (``start``, ``size``), and for a
    global its place in the globals' vector (``global_start``; ``None`` for a path)."""

    name: str
    start: int
    size: int
    unconstrained_shape: torch.Size
    support: constraints.Constraint
    global_start: int | None


def global_positions(slots: list[SiteSlot]) -> list[int]:
    """The positions of the globals' coordinates in the latent vector, in order."""
    return [
        index
        for slot in slots
        if slot.global_start is not None
        for index in range(slot.start, slot.start + slot.size)
    ]


class _LatentsDone(Exception):
    """Raised once every latent site of a model run has its value: the rest of the model
    (its observations) is not the guide's business."""


class _RunWithGuideValues(Messenger):
    """Inside a model run: globals take the given values; each path site is drawn from
    (``draw``) or scored against (else) its prior's corrected flow. The run stops after the
    last latent site (``_LatentsDone``), before any observation: the guide needs nothing
    after it, and an observation's plate would otherwise be placed against the particle plate
    of a caller that sized it from the guide alone (``Predictive`` does)."""

    def __init__(
        self,
        global_values: dict[str, Tensor],
        path_inputs: dict[str, Tensor],
        corrections: dict[str, Callable[[], PathCorrection]],
        draw: bool,
    ) -> None:
        super().__init__()
        self.global_values = global_values
        self.path_inputs = path_inputs
        self.corrections = corrections
        self.draw = draw
        self.results: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.pending = set(global_values) | set(path_inputs)

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        name = msg["name"]
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if name in self.global_values:
            value = self.global_values[name]
        elif name in self.path_inputs:
            prior = msg["fn"]
            if not isinstance(prior, GaussianPath):
                raise ValueError(
                    f"site {name!r} was a GaussianPath when the guide was built, now it is a "
                    f"{type(prior).__name__}: a guide follows one model structure"
                )
            flow = PathFlow(prior, self.corrections[name]())
            given = self.path_inputs[name]
            if self.draw:
                value, log_det = flow._call_with_log_det(given)
                self.results[name] = (value, given, log_det)
            else:
                noise, log_det = flow._inverse_with_log_det(given)
                value = given
                self.results[name] = (value, noise, log_det)
        else:
            raise ValueError(
                f"the model has a latent site {name!r} that it did not have when the guide was "
                "built: a guide follows one model structure"
            )
        msg["value"] = value
        msg["is_observed"] = True
        self.pending.discard(name)
        if not self.pending:
            raise _LatentsDone


PathBases = Callable[[dict[str, Tensor], torch.Size], dict[str, ResidualParts]]
"""``path_bases(global_values, batch)``: each path's free parts for the drawn globals, which
its residual adds to (:func:`~pyro_arflow.path_laplace.conditional_laplace`)."""


class StructuredTransform(CachedTransform):
    r"""White noise :math:`z` to the whole unconstrained latent vector: the globals by their
    flow, each path by its prior's corrected flow (module docstring). Bound to one call's
    model arguments.

    ``_call`` draws (each path by :class:`~pyro_arflow.paths.PathFlow`), ``_inverse`` scores
    a given latent vector (each path in one pass); either way the model runs once, hidden from
    outer handlers.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: dict,
        slots: list[SiteSlot],
        globals_transform: Transform | None,
        residuals: dict[str, PathResidual],
        path_bases: PathBases | None = None,
    ) -> None:
        super().__init__(cache_size=1)
        self.model, self.args, self.kwargs = model, args, kwargs
        self.slots = slots
        self.globals_transform = globals_transform
        self.residuals = residuals
        self.path_bases = path_bases
        self.global_index = global_positions(slots)

    def _call_with_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(z, draw=True)

    def _inverse_with_log_det(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(latent, draw=False)

    def _log_det(self, z: Tensor, latent: Tensor) -> Tensor:
        return self._run(latent, draw=False)[1]

    def _run(self, given: Tensor, draw: bool) -> tuple[Tensor, Tensor]:
        """``draw``: ``given`` is noise, returns (latent, log det); else ``given`` is a latent
        vector, returns (noise, log det). The log det is that of noise -> latent."""
        batch = given.shape[:-1]
        log_det = given.new_zeros(batch)
        globals_in = given[..., self.global_index] if self.global_index else None
        theta = globals_noise = None
        if globals_in is not None and self.globals_transform is not None:
            if draw:
                globals_noise, theta = globals_in, self.globals_transform(globals_in)
            else:
                theta, globals_noise = globals_in, self.globals_transform.inv(globals_in)
            log_det = log_det + self.globals_transform.log_abs_det_jacobian(globals_noise, theta)
        global_values, path_inputs = {}, {}
        for slot in self.slots:
            if slot.global_start is None:
                piece = given[..., slot.start : slot.start + slot.size]
                path_inputs[slot.name] = piece.reshape(batch + slot.unconstrained_shape)
            else:
                assert theta is not None
                piece = theta[..., slot.global_start : slot.global_start + slot.size]
                unconstrained = piece.reshape(batch + slot.unconstrained_shape)
                global_values[slot.name] = biject_to(slot.support)(unconstrained)
        bases = self.path_bases(global_values, batch) if self.path_bases is not None else {}
        corrections = {
            name: (lambda r=residual, b=bases.get(name): r.correction(theta, len(batch), b))
            for name, residual in self.residuals.items()
        }
        runner = _RunWithGuideValues(global_values, path_inputs, corrections, draw)
        try:
            with poutine.block(), runner:
                self.model(*self.args, **self.kwargs)
        except _LatentsDone:
            pass
        pieces = []
        for slot in self.slots:
            if slot.global_start is None:
                value, noise, path_log_det = runner.results[slot.name]
                # a site with batch dims of its own: one log-det per member, summed, as the
                # latent vector has one density per draw
                log_det = log_det + path_log_det.reshape(batch + (-1,)).sum(-1)
                pieces.append((value if draw else noise).reshape(batch + (slot.size,)))
            else:
                source = theta if draw else globals_noise
                assert source is not None
                start = slot.global_start
                pieces.append(source[..., start : start + slot.size])
        return torch.cat(pieces, dim=-1), log_det
