r"""``fit``: train a guide until its ELBO is flat, then anneal; one rule for every guide.

The rule, in two phases, with Pyro's ``ClippedAdam`` (gradient norm clipped at 10):

1. **Until flat, twice.** At a constant learning rate, every ``check_every`` steps once
   ``min_steps`` are done, regress the per-step ELBO estimates of the last half of the
   steps at this rate on the step. The ELBO is *flat* when the slope's upper bound, slope
   plus two standard errors, is below ``tolerance`` nats per 1000 steps: a guide still
   climbing is seen to climb, and how long it takes to tell depends on how noisy its ELBO
   is, not on a fixed start. A guide close to the posterior has a quiet ELBO and stops
   early; a noisy one is given the steps its noise needs. (A rule comparing windows with
   the best one so far stops too early: the best is biased upward by the noise.) Once flat,
   the learning rate drops 10x and training goes on until the ELBO is flat again (after at
   least ``min_steps // 2`` steps): a plateau set by the optimizer's noise, not by the
   guide, is then climbed. (With one plateau, a full-rank Gaussian on the volatility
   example gained 30 nats in the anneal that followed it.) ``tolerance`` is the last
   plateau's; the first, at a 10 times larger rate, allows a 10 times larger climb: a step
   moves the parameters in proportion to the rate, and so does the climb that says they
   still get somewhere. (At one tolerance for both, the prior-structured guide on the
   volatility and Nile benchmarks climbed 0.3 nats in the 2000 steps it waited for the first
   plateau, and 2 nats in the first 500 after the drop.)
2. **Anneal**: half as many steps again as phase 1 took (at least 500, at most 2000), the
   learning rate decaying another 10x, and the parameters averaged over these steps (Polyak and
   Juditsky 1992): the guide ends at the average. A flat trace says the optimizer no longer
   gains on average, not that the parameters stand still: at a constant rate they wander,
   and so do the posterior means they give.

For an :class:`~pyro_arflow.AutoARFlow` with latent paths the objective changes with the
learning rate (``mass_covering``): the reverse KL (``Trace_ELBO``) to the first plateau, which
finds the posterior's bulk fast, then the Rényi bound of order 1/2 (``RenyiELBO``, Li and
Turner 2016, https://arxiv.org/abs/1602.02311) for the second plateau and the anneal, which
spreads the guide over the mass the KL left out. On the three latent-path benchmarks, over
seeds, it widened the globals' sds toward NUTS's at about the KL's cost (the user guide's
"Which objective when"); other guides keep the KL unless asked.

On request (``sticking_the_landing``), an :class:`~pyro_arflow.AutoARFlow` sticks the landing
(:mod:`pyro_arflow.landing`) from the second plateau on: near the optimum its gradient's
variance is the smaller one, and vanishes at the exact posterior; far from it, it can be
larger and diverge, so the first plateau keeps the standard estimator.

Before phase 1, a fresh :class:`~pyro_arflow.AutoARFlow` is put at the model's Laplace
approximation (:func:`~pyro_arflow.laplace_warm_start`; ``warm_start``), so that its first
steps go to what is not Gaussian: a guide without latent paths at the joint one, a guide with
paths at each path's given the initial globals (:mod:`pyro_arflow.path_laplace`). A model
without a proper mode (a funnel) is left where the guide starts, with a warning.

``max_steps`` and ``max_seconds`` cap the whole run: phase 1 ends early to leave the anneal
its share. A step whose loss is not finite, or which raises the ``ValueError`` of Pyro's or
this package's validation, ends the run as *diverged*: the parameters go back to the last
check's (every ``check_every`` steps), a ``RuntimeWarning`` says so, and the result's status
names the step. No fit ends with a silent NaN guide.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.infer.util import zero_grads
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

from ._checks import check_positive_int
from ._model_checks import rng_state_kept
from .guides import AutoARFlow
from .path_laplace import PathLaplaceApproximation
from .warm_start import LaplaceApproximation, laplace_warm_start

__all__ = ["FitResult", "fit"]

WARM_START_MAX_DIM = 1000
"""Largest latent vector without paths that ``fit`` warm-starts by default: its Hessian takes one
backward pass through the model per latent (a path's takes three per state coordinate)."""


@dataclass
class FitResult:
    """How one ``fit`` went.

    Attributes:
        elbo: the ELBO estimate of every finished step.
        seconds: wall time of the run.
        flat_at: the step at which the ELBO was flat by the rule at the reduced learning rate
            (``None``: a cap came first).
        stopped: ``"flat"``, ``"steps"``, ``"time"`` or ``"diverged"``.
        warm_start: the Laplace approximation the guide started from, or ``None``.
        num_particles: the ELBO particles per step (a given ``loss``'s own; ``None`` for a
            loss without a ``num_particles``).
        mass_covering_from: the step from which the loss was the Rényi bound (``fit``'s
            ``mass_covering``), or ``None``.
        mass_covering_until: the step at which a step under the Rényi bound diverged, the
            parameters went back to the last check's and the KL took over again, or
            ``None``.

    Example::

        >>> import pyro_arflow as af
        >>> result = af.FitResult(elbo=[-9.0, -5.0, -4.0, -4.0], flat_at=4, stopped="flat")
        >>> result.status, result.steps, result.smoothed(2)
        ('converged (flat at 4)', 4, ([2, 4], [-7.0, -4.0]))
    """

    elbo: list[float] = field(default_factory=list)
    seconds: float = 0.0
    flat_at: int | None = None
    stopped: str = "steps"
    warm_start: LaplaceApproximation | PathLaplaceApproximation | None = None
    num_particles: int | None = None
    mass_covering_from: int | None = None
    mass_covering_until: int | None = None

    @property
    def steps(self) -> int:
        return len(self.elbo)

    @property
    def converged(self) -> bool:
        return self.flat_at is not None and self.stopped != "diverged"

    @property
    def diverged(self) -> bool:
        return self.stopped == "diverged"

    @property
    def status(self) -> str:
        """``"converged (flat at N)"``, ``"step cap"``, ``"time cap"`` or
        ``"diverged (step N)"``."""
        if self.stopped == "diverged":
            return f"diverged (step {self.steps + 1})"
        if self.flat_at is not None:
            return f"converged (flat at {self.flat_at})"
        return "time cap" if self.stopped == "time" else "step cap"

    def smoothed(self, window: int) -> tuple[list[int], list[float]]:
        """The mean ELBO of each full window of steps, at the window's last step."""
        check_positive_int(window, "window")
        count = self.steps // window * window
        means = torch.tensor(self.elbo[:count], dtype=torch.float64).view(-1, window).mean(1)
        return [window * (k + 1) for k in range(len(means))], means.tolist()


def elbo_slope_bound(elbo: list[float]) -> float:
    """Nats per 1000 steps: the least-squares slope of ``elbo`` on the step, plus two standard
    errors (from the residuals, the steps' noise taken as independent)."""
    values = torch.tensor(elbo, dtype=torch.float64)
    steps = torch.arange(len(values), dtype=torch.float64)
    steps, values = steps - steps.mean(), values - values.mean()
    spread = (steps * steps).sum()
    slope = (steps * values).sum() / spread
    residual = values - slope * steps
    standard_error = (residual.square().sum() / max(len(values) - 2, 1) / spread).sqrt()
    return 1000.0 * float(slope + 2.0 * standard_error)


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    max_steps: int = 30000,
    max_seconds: float | None = None,
    lr: float = 0.01,
    num_particles: int | str = "auto",
    loss: ELBO | None = None,
    tolerance: float = 0.25,
    min_steps: int = 1000,
    check_every: int = 100,
    progress: bool = True,
    warm_start: bool | None = None,
    sticking_the_landing: str = "never",
    mass_covering: str = "auto",
    **kwargs: Any,
) -> FitResult:
    """Train ``guide`` on ``model`` until the ELBO is flat, then anneal (module docstring).

    Arguments:
        model: a Pyro model; ``*args`` and ``**kwargs`` are its arguments.
        guide: any Pyro guide (an autoguide of this package or of Pyro's, or a function).
        max_steps: most SVI steps in all, annealing included.
        max_seconds: most seconds in all (``None``: no time cap).
        lr: the learning rate of phase 1.
        num_particles: ELBO particles per step, vectorized (for the default ``loss``), or
            ``"auto"`` (default): the most of 4, 8, 16 and 32 whose gradient costs at most
            ``PARTICLE_COST_LIMIT`` times a 4-particle one, timed before training (a small
            model gets 32 for little more than the price of 4; a large one stays at 4).
            Particles cut the gradient's noise, and with it the steps the rule waits for
            flatness and the globals' spread lost to that noise (measured in the user
            guide's "Training"). Pass a number for runs that do not depend on the machine's
            timing; ``FitResult.num_particles`` says what was used.
        loss: the objective to minimize, throughout; default ``Trace_ELBO(num_particles,
            vectorize_particles=True)``, then as ``mass_covering`` says.
        tolerance: nats per 1000 steps under which the ELBO is flat at the last plateau's
            learning rate (``lr / 10``); 10 times as many at ``lr``.
        min_steps: the first check of flatness.
        check_every: steps between checks (and between the snapshots a divergence goes
            back to).
        progress: show a tqdm progress bar.
        warm_start: ``None`` (default): start a fresh ``AutoARFlow`` at the Laplace
            approximation (:func:`~pyro_arflow.laplace_warm_start`) when the model has a
            proper mode (else warn and start as built): without latent paths, of at most
            ``WARM_START_MAX_DIM`` latents; with paths, each path's given the initial globals
            (its cost grows as the path's length). ``True``: always (a ``ValueError`` where
            it cannot); ``False``: never.
        sticking_the_landing: for an ``AutoARFlow``, when to drop the score term of the
            latents its flow draws (:mod:`pyro_arflow.landing`): ``"never"`` (default: the
            guide's own setting throughout), ``"after the first plateau"`` (near the optimum,
            where its variance is the smaller; far from it, it can be far larger and
            diverge), ``"always"``, or ``"auto"``: after the first plateau when the flow draws
            at most ``LANDING_MAX_LATENTS`` latents (its inverse, which scoring then runs, is
            cheap), never otherwise. The guide's own setting is restored at the end. Not the
            default: measured on the time-series benchmarks it helped on one and hurt on the
            other (the user guide's "Sticking the landing").
        mass_covering: with the default ``loss``, when to trade the KL for the Rényi bound
            ``RenyiELBO(alpha=0.5)`` at the same particles: ``"after the first plateau"``,
            ``"never"``, or ``"auto"`` (default): after the first plateau for an
            ``AutoARFlow`` with latent paths, never otherwise. The reverse KL is
            mode-seeking and leaves the spread of the globals too narrow; the Rényi bound of
            order 1/2 (Li and Turner 2016) weighs the particles by the square roots of their
            importance weights and widens the guide where it misses mass, at the cost of a
            noisier gradient, which the second plateau's smaller learning rate keeps in hand.
            A guide that ends far from the posterior (importance weights dominated by a few
            draws) gets a gradient resting on a few particles: measured on the volatility
            benchmark, the prior-structured guide gained and the flat masked one lost (the
            user guide's "Which objective when"). A step that diverges under that bound
            sends the parameters back to the last check's and training on under the KL, with
            a ``RuntimeWarning`` (a second divergence ends the run).
            ``FitResult.mass_covering_from`` and ``mass_covering_until`` say from and until
            which step; the trace is the Rényi bound's between them.

    Returns:
        a :class:`FitResult`: ELBO trace, steps, seconds, status.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model(data):
        ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(data)):
        ...         pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)
        >>> guide = af.AutoARFlow(model, hidden_dims=[8])
        >>> result = af.fit(model, guide, torch.randn(20) + 3.0, max_steps=300, progress=False)
        >>> result.steps <= 300, result.status in ("step cap", "time cap") or result.converged
        (True, True)
    """
    for value, name in ((max_steps, "max_steps"), (min_steps, "min_steps")):
        check_positive_int(value, name)
    check_positive_int(check_every, "check_every")
    if num_particles != "auto":
        check_positive_int(num_particles, "num_particles")
    for value, name in ((lr, "lr"), (tolerance, "tolerance")):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if max_seconds is not None and not (isinstance(max_seconds, int | float) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a number > 0 or None, got {max_seconds!r}")
    optimizer = ClippedAdam({"lr": lr, "clip_norm": 10.0})
    result = FitResult()
    start = time.perf_counter()
    fresh = isinstance(guide, AutoARFlow) and guide.prototype_trace is None
    if fresh:
        guide._setup_prototype(*args, **kwargs)  # its size decides the defaults below
    result.warm_start = _warm_start(model, guide, warm_start, fresh, args, kwargs)
    mass_covering = _mass_covering_schedule(guide, mass_covering)
    later_loss = None
    if loss is None:
        if num_particles == "auto":
            num_particles = _affordable_particles(model, guide, args, kwargs)
        loss = Trace_ELBO(num_particles=int(num_particles), vectorize_particles=True)
        if mass_covering == "after the first plateau":
            later_loss = RenyiELBO(
                alpha=RENYI_ALPHA, num_particles=int(num_particles), vectorize_particles=True
            )
    result.num_particles = getattr(loss, "num_particles", None)
    svi = SVI(model, guide, optimizer, loss)
    snapshot = _snapshot()  # empty for a guide whose parameters appear at its first step

    def step() -> bool:
        nonlocal svi
        try:
            value = svi.step(*args, **kwargs)
        except ValueError as error:
            if not result.elbo:  # a model or guide that never ran is the caller's error
                raise
            value, cause = math.nan, f"{type(error).__name__}: {error}"
        else:
            cause = f"loss {value}"
        if not math.isfinite(value):
            _restore(snapshot)
            if result.mass_covering_from is not None and result.mass_covering_until is None:
                result.mass_covering_until = result.steps + 1  # back to the KL, once
                svi = SVI(model, guide, optimizer, loss)
                _warn_diverged(result.steps + 1, cause, "training goes on under the KL")
                return True
            _warn_diverged(result.steps + 1, cause)
            result.stopped = "diverged"
            return False
        result.elbo.append(-value)
        if result.steps == 1 and not snapshot:
            snapshot.update(_snapshot())
        bar.update()
        return True

    landing = _Landing(guide, sticking_the_landing)
    with landing, tqdm(total=max_steps, desc="fit", disable=not progress, leave=False) as bar:
        plateau_start = 0  # the step at which the current learning rate began
        for plateau in range(PLATEAUS):
            if plateau:
                _scale_learning_rate(optimizer, PLATEAU_DROP)
                landing.after_first_plateau()
                if later_loss is not None:  # the optimizer, and its moments, carry over
                    svi = SVI(model, guide, optimizer, later_loss)
                    result.mass_covering_from = result.steps + 1
            flat = False
            while not flat:
                if result.steps >= max_steps - _anneal_steps(result.steps):
                    break
                if max_seconds is not None and time.perf_counter() - start > 0.8 * max_seconds:
                    result.stopped = "time"
                    break
                if not step():
                    result.seconds = time.perf_counter() - start
                    return result
                if result.steps % check_every == 0:
                    snapshot = _snapshot()
                    bar.set_postfix(elbo=f"{sum(result.elbo[-check_every:]) / check_every:.2f}")
                    since = result.steps - plateau_start
                    if since >= (min_steps if plateau == 0 else min_steps // 2):
                        recent = result.elbo[plateau_start + since // 2 :]
                        allowed = tolerance / PLATEAU_DROP ** (PLATEAUS - 1 - plateau)
                        flat = elbo_slope_bound(recent) < allowed
            if not flat:
                break
            plateau_start = result.steps
        else:
            result.flat_at = result.steps
            result.stopped = "flat"
        anneal = min(_anneal_steps(result.steps), max_steps - result.steps)
        if max_seconds is not None and result.steps:
            per_step = (time.perf_counter() - start) / result.steps
            left = max_seconds - (time.perf_counter() - start)
            anneal = min(anneal, max(int(left / per_step), 0))
        _set_decay(optimizer, 0.1 ** (1.0 / max(anneal, 1)))
        average = _RunningAverage()
        for _ in range(anneal):
            if not step():
                break
            average.add()
        if not result.diverged:
            average.install()
    result.seconds = time.perf_counter() - start
    return result


PLATEAUS, PLATEAU_DROP = 2, 0.1
MASS_COVERING_SCHEDULES = ("auto", "after the first plateau", "never")
RENYI_ALPHA = 0.5
"""The order of the Rényi bound ``fit`` turns to (``mass_covering``)."""


def _mass_covering_schedule(guide: Callable, schedule: str) -> str:
    """``mass_covering`` with ``"auto"`` resolved: after the first plateau for an
    :class:`~pyro_arflow.AutoARFlow` with latent paths, never otherwise."""
    if schedule not in MASS_COVERING_SCHEDULES:
        raise ValueError(
            f"mass_covering must be one of {MASS_COVERING_SCHEDULES}, got {schedule!r}"
        )
    if schedule != "auto":
        return schedule
    with_paths = isinstance(guide, AutoARFlow) and guide._has_paths()
    return "after the first plateau" if with_paths else "never"


PARTICLE_CHOICES = (4, 8, 16, 32)
PARTICLE_COST_LIMIT = 2.0
"""``num_particles="auto"`` takes the most of ``PARTICLE_CHOICES`` whose gradient costs at
most this many times the fewest's."""


def _affordable_particles(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The most of :data:`PARTICLE_CHOICES` whose ELBO gradient takes at most
    :data:`PARTICLE_COST_LIMIT` times as long as the fewest's (each the median of three
    timings after a warm-up; the gradients are discarded, and the random state is put back,
    so that training draws what it would with the count given by hand)."""
    chosen, *more = PARTICLE_CHOICES
    with rng_state_kept():
        budget = PARTICLE_COST_LIMIT * _gradient_seconds(model, guide, args, kwargs, chosen)
        for count in more:  # upwards, so that a costly model is timed at few particles only
            if _gradient_seconds(model, guide, args, kwargs, count) > budget:
                break
            chosen = count
    return chosen


def _gradient_seconds(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, particles: int
) -> float:
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    seconds = []
    for _ in range(4):
        with poutine.trace(param_only=True) as parameters:
            begin = time.perf_counter()
            value = loss.differentiable_loss(model, guide, *args, **kwargs)
            if value.requires_grad:  # a guide with nothing to train has no backward pass
                value.backward()
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - begin)
        zero_grads({site["value"].unconstrained() for site in parameters.trace.nodes.values()})
    return sorted(seconds[1:])[1]  # the first run warms up


LANDING_SCHEDULES = ("auto", "never", "after the first plateau", "always")
LANDING_MAX_LATENTS = 64
"""``"auto"`` sticks the landing for flows over at most this many latents."""


class _Landing:
    """Switches an ``AutoARFlow``'s sticking the landing as ``fit``'s schedule says, and
    back to the guide's own setting on exit."""

    def __init__(self, guide: Callable, schedule: str) -> None:
        if schedule not in LANDING_SCHEDULES:
            raise ValueError(
                f"sticking_the_landing must be one of {LANDING_SCHEDULES}, got {schedule!r}"
            )
        if schedule == "auto":
            small = isinstance(guide, AutoARFlow) and 0 < guide.global_dim <= LANDING_MAX_LATENTS
            schedule = "after the first plateau" if small else "never"
        elif schedule != "never" and not isinstance(guide, AutoARFlow):
            raise ValueError(
                f"sticking_the_landing={schedule!r} needs an AutoARFlow guide, got {guide!r}"
            )
        self.guide, self.schedule = guide, schedule
        self.own = getattr(guide, "sticking_the_landing", None)

    def __enter__(self) -> _Landing:
        if self.schedule == "always":
            self.guide.sticking_the_landing = True
        return self

    def after_first_plateau(self) -> None:
        if self.schedule == "after the first plateau":
            self.guide.sticking_the_landing = True

    def __exit__(self, *exc_info: Any) -> None:
        if self.own is not None:
            self.guide.sticking_the_landing = self.own


def _param_groups(optimizer: ClippedAdam) -> Iterator[dict[str, Any]]:
    """Every parameter group of every per-parameter optimizer Pyro made."""
    for parameter_optimizer in optimizer.optim_objs.values():
        yield from parameter_optimizer.param_groups


def _scale_learning_rate(optimizer: ClippedAdam, factor: float) -> None:
    for group in _param_groups(optimizer):
        group["lr"] *= factor


def _anneal_steps(phase_one: int) -> int:
    return min(max(phase_one // 2, 500), 2000)


def _set_decay(optimizer: ClippedAdam, per_step: float) -> None:
    """From now on every parameter's learning rate is multiplied by ``per_step`` each step."""
    for group in _param_groups(optimizer):
        group["lrd"] = per_step


class _RunningAverage:
    """The running mean of every parameter in Pyro's param store since it was made."""

    def __init__(self) -> None:
        self.count = 0
        self.means: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self) -> None:
        self.count += 1
        for name, value in pyro.get_param_store().named_parameters():
            mean = self.means.get(name)
            if mean is None or mean.shape != value.shape:
                self.means[name] = value.detach().clone()
            else:
                mean.add_(value.detach() - mean, alpha=1.0 / self.count)

    def install(self) -> None:
        _restore(self.means)


def _snapshot() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: value.detach().clone() for name, value in store.named_parameters()}


@torch.no_grad()
def _restore(snapshot: dict[str, torch.Tensor]) -> None:
    for name, value in pyro.get_param_store().named_parameters():
        if name in snapshot:
            value.copy_(snapshot[name])


def _warn_diverged(step: int, cause: str, then: str | None = None) -> None:
    advice = then or (
        "Lower lr, or start the guide closer to the posterior (init_loc_fn, init_scale)"
    )
    warnings.warn(
        f"training diverged at step {step} ({cause}); the parameters are back at the last "
        f"check's. {advice}",
        RuntimeWarning,
        stacklevel=3,
    )


def _warm_start(
    model: Callable,
    guide: Callable,
    requested: bool | None,
    fresh: bool,
    args: tuple,
    kwargs: dict,
) -> LaplaceApproximation | None:
    """The Laplace warm start ``fit`` was asked for (module docstring), or ``None``."""
    if requested is False:
        return None
    if not isinstance(guide, AutoARFlow):
        if requested:
            raise ValueError(f"warm_start=True needs an AutoARFlow guide, got {guide!r}")
        return None
    if requested is None:
        too_large = not guide._has_paths() and guide.latent_dim > WARM_START_MAX_DIM
        if not fresh or too_large:
            return None  # a guide that has run may have trained: it is left be
        try:
            return laplace_warm_start(model, guide, *args, **kwargs)
        except ValueError as error:
            warnings.warn(
                f"no Gaussian warm start ({error}); training starts from the guide as built",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
    return laplace_warm_start(model, guide, *args, **kwargs)
