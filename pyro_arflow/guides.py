r"""``AutoARFlow``: an autoguide built from a registered flow, and from the model's own paths.

Where the model declares latent paths with :class:`~pyro_arflow.GaussianPath`, the guide
follows each one's prior flow, corrected by a learned residual that reads the globals
(``paths="prior"``, the default; see :mod:`pyro_arflow.structured`). Every other latent,
and every latent with ``paths="flat"``, goes into one flow over their unconstrained,
concatenated vector :math:`\theta`:

.. math::

    \theta = m + s \odot f(z), \qquad z \sim \mathcal{N}(0, I),

where :math:`f` is the flow (a stack of autoregressive layers that starts as the identity),
:math:`m` starts at the point of ``init_loc_fn`` and :math:`s` at ``init_scale``. At step 0
it therefore *is* ``AutoNormal`` started the same way, and training only adds what the flow
buys (Kingma et al. 2016 use IAF guides this way).
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import biject_to

from ._checks import check_positive_int
from ._model_checks import argument_shapes, check_no_subsampled_latents, rng_state_kept
from ._params import module_context, store_name, synced_child
from .distributed import check_lazy_parameters_may_appear
from .landing import StickingTheLanding, detached_parameters
from .path_laplace import conditional_laplace
from .paths import GaussianPath, PathFlow
from .registry import build_flow
from .structured import PathResidual, SiteSlot, StructuredTransform, global_positions
from .validation import check_finite

__all__ = ["AutoARFlow", "default_flow"]


class _DefaultFlow(str):
    """The default ``flow``: equal to ``"iaf"``, and told apart from an explicit ``"iaf"`` by
    its type (which pickling keeps), so that the default may adapt to the number of latents
    (:func:`default_flow`) while a name given by hand builds exactly what it names."""


DEFAULT_FLOW = _DefaultFlow("iaf")
LARGEST_MASKED_DEFAULT = 512
"""The default flow is the masked ``"iaf"`` up to this many latents; its hidden layers need
``D - 1`` units or more, so its size grows as ``D^2`` (80M parameters at D = 2000)."""
LARGEST_DENSE_LINEAR_DEFAULT = 2048
"""Beyond the masked default, the linear autoregressions are dense up to this many latents
(``D^2`` weights each), banded above."""
DEFAULT_BANDWIDTH = 32


def default_flow(num_latents: int) -> tuple[str, dict[str, Any]]:
    """The flow of ``AutoARFlow(model)`` over ``num_latents`` latents: its name and keywords.

    Up to ``LARGEST_MASKED_DEFAULT`` latents the masked ``"iaf"`` (each IAF layer followed
    by a dense linear autoregression: a full-rank Gaussian and the masked network's
    nonlinearity); above, ``"iaf-conv"``, whose size does not grow with the latents, with the
    linear autoregressions dense up to ``LARGEST_DENSE_LINEAR_DEFAULT`` latents (still a
    full-rank Gaussian) and banded (``DEFAULT_BANDWIDTH``) beyond.

    Example::

        >>> from pyro_arflow.guides import default_flow
        >>> default_flow(100), default_flow(2000)[0], default_flow(10_000)[1]
        (('iaf', {}), 'iaf-conv', {'linear_autoregression': True, 'bandwidth': 32})
    """
    if num_latents <= LARGEST_MASKED_DEFAULT:
        return "iaf", {}
    if num_latents <= LARGEST_DENSE_LINEAR_DEFAULT:
        return "iaf-conv", {"linear_autoregression": True}
    return "iaf-conv", {"linear_autoregression": True, "bandwidth": DEFAULT_BANDWIDTH}


MASKED_FLOWS = ("iaf", "maf")
MIN_MASKED_WIDTH = 64
"""The built-in masked flows' default hidden layer is ``3 D + 1`` units wide (as Pyro's), and at
least this: over a few globals 10 units left a Nile guide's mean error at 0.103 NUTS sds,
64 units at 0.035."""
PATHS = ("prior", "laplace", "flat")
"""What ``paths`` may say (:class:`AutoARFlow`)."""
INIT_SCALE_RANGE = (1e-3, 10.0)
"""``init_scale`` values outside this range draw a warning."""
LARGE_FLOW_MB = 256
"""A flow whose parameters take more memory than this draws a warning."""


class AutoARFlow(AutoContinuous):
    """A normalizing-flow autoguide: standard normal -> registered flow -> elementwise affine.

    Arguments:
        model: a Pyro model with continuous latent sites.
        flow: a registered flow name (``"iaf"``, ``"iaf-lstm"``, ``"iaf-conv"``, the MAFs, or
            a plugin's). IAF is the natural choice: sampling and scoring its own samples take
            one pass; MAF samples by a sequential solve. Left at its default (and without
            flow keywords), the flow adapts to the number of latents it draws
            (:func:`default_flow`: the masked ``"iaf"`` up to 512, ``"iaf-conv"`` beyond);
            a name given by hand builds exactly what it names.
        num_flows: number of flow layers.
        init_loc_fn: per-site initialization, as for every Pyro autoguide; unlike Pyro's
            ``AutoIAFNormal`` it is honoured.
        init_scale: initial scale of every unconstrained coordinate, finite and > 0. Between
            1e-3 and 10 it trains in the usual budgets; outside, a warning says so (a tiny
            scale takes thousands of steps to grow, a huge one makes the first losses explode).
        paths: ``"prior"`` (default): each :class:`~pyro_arflow.GaussianPath` site is drawn by
            its prior's flow plus a learned residual that reads the other latents (the
            globals, drawn first by the flow); ``"laplace"``: the same, the residual added to
            the path's Laplace approximation given each draw of the globals
            (:func:`~pyro_arflow.path_laplace.conditional_laplace`: a linear-Gaussian path's
            exact conditional, at two to five times the step's cost); ``"flat"``: every
            latent goes into the flow. A model without such sites gets the flow alone either
            way. A path's residual starts at zero: as built, the guide's law of the path is
            the prior's at the initial globals (each draw's Laplace approximation about the
            prior's noise-free path, under ``"laplace"``), whatever ``init_loc_fn`` says of
            the path; :func:`~pyro_arflow.fit` (by default) and
            :func:`~pyro_arflow.laplace_warm_start` then set it to the path's Laplace
            approximation given those globals (under ``"laplace"``: move the path about
            which each draw's is taken to that approximation's mode).
        path_hidden_dim: width of the ``tanh`` layer through which each path's residual
            reads the globals (0: linearly).
        sticking_the_landing: drop the score term of the latents the flow draws (all of a
            flat guide's, the globals of one with paths; :mod:`pyro_arflow.landing`): the
            same expected gradient, whose variance vanishes at the exact posterior. Scoring a
            draw then runs the flow's inverse, an IAF's sequential direction: cheap over a
            few globals, dear for a flat guide over many latents. Any ELBO and
            :func:`~pyro_arflow.fit` use it as they find it; it can be switched on a built
            guide.
        flow_kwargs: passed to :func:`~pyro_arflow.build_flow` (``hidden_dims``: the masked
            flows default to one hidden layer of ``3 D + 1`` units, at least 64;
            ``hidden_size``, ``orderings``, ...). They are checked at construction, on a
            two-dimensional stand-in of the flow; the flow itself is built at the guide's first
            call, when the size of the latent vector is known.

    Like every Pyro autoguide, its parameters live in Pyro's param store under its class
    name (``AutoARFlow.loc``, ``AutoARFlow.flow$$$...``): two ``AutoARFlow`` guides in one
    process share them, and one fitted to a model of another size raises ``ValueError``
    naming the clashing parameter. Call ``pyro.clear_param_store()`` between fits.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model():
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(0.0, scale).expand([3]).to_event(1))
        >>> guide = af.AutoARFlow(model, flow="iaf", hidden_dims=[16])
        >>> adam = pyro.optim.Adam({"lr": 0.01})
        >>> svi = pyro.infer.SVI(model, guide, adam, pyro.infer.Trace_ELBO())
        >>> loss = svi.step()
        >>> sorted(guide.median())
        ['scale', 'x']
    """

    def __init__(
        self,
        model: Any,
        flow: str = DEFAULT_FLOW,
        num_flows: int = 2,
        init_loc_fn: Any = init_to_median,
        init_scale: float = 0.1,
        paths: str = "prior",
        path_hidden_dim: int = 16,
        sticking_the_landing: bool = False,
        **flow_kwargs: Any,
    ) -> None:
        if (
            isinstance(path_hidden_dim, bool)
            or not isinstance(path_hidden_dim, int)
            or (path_hidden_dim < 0)
        ):
            raise ValueError(f"path_hidden_dim must be an int >= 0, got {path_hidden_dim!r}")
        if paths not in PATHS:
            raise ValueError(f"paths must be one of {PATHS}, got {paths!r}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)):
            raise ValueError(f"init_scale must be a number > 0, got {init_scale!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        check_positive_int(num_flows, "num_flows")
        if "context_dim" in flow_kwargs:
            raise ValueError(
                "AutoARFlow is a guide over a model's global latents and takes no context_dim; "
                "for amortized (per-data-point) guides use af.conditional_iaf inside your guide"
            )
        if not INIT_SCALE_RANGE[0] <= init_scale <= INIT_SCALE_RANGE[1]:
            warnings.warn(
                f"init_scale={init_scale!r} is outside {INIT_SCALE_RANGE}, the range that "
                "trains in the usual budgets: a tiny scale takes thousands of steps to grow, a "
                "huge one makes the first losses explode",
                UserWarning,
                stacklevel=2,
            )
        stand_in = build_flow(flow, 2, num_flows, **flow_kwargs)  # fail now, not at a step
        if any(getattr(m, "reads_output", False) for m in stand_in.modules()):
            warnings.warn(
                f"the flow {flow!r} samples by a sequential solve (a MAF reads its output): a "
                "guide samples at every step, so each step solves one latent at a time, "
                "hundreds of times slower than an IAF at a few hundred latents. Use the IAF of "
                "the same family ('iaf', 'iaf-lstm'): it samples in one pass",
                UserWarning,
                stacklevel=2,
            )
        self._flow_name = flow
        self._num_flows = num_flows
        self._init_scale = float(init_scale)
        self._flow_kwargs = flow_kwargs
        self._paths = paths
        self._path_hidden_dim = path_hidden_dim
        self.sticking_the_landing = bool(sticking_the_landing)
        self._model_arguments: tuple[tuple, dict] | None = None
        # the model as written, for the paths' draws: Pyro wraps ``self.model`` in an init
        # messenger, which would draw every site from its prior before the guide sets it
        self._plain_model = (model,)  # a tuple: a PyroModule model is not a submodule
        super().__init__(model, init_loc_fn=init_loc_fn)

    def __getstate__(self) -> dict[str, Any]:
        """Pyro's autoguides pickle without their model, and drop it from the live guide too;
        this one keeps it, and pickles it along when it has paths (it runs the model to draw
        them), so such a model must pickle: a module-level function, not a closure."""
        model = self._model
        state = super().__getstate__()
        self._model = model
        if self.prototype_trace is not None and self._has_paths():
            state["_model"] = model
        else:
            state.pop("_plain_model", None)
        return state

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        """Read the model's latent sites and build the guide's parts. The global random state
        is left as it was (initialization draws from the priors), so a seed gives the same
        draws whether or not the guide had been set up before."""
        with rng_state_kept():
            self._build(*args, **kwargs)

    def _build(self, *args: Any, **kwargs: Any) -> None:
        check_lazy_parameters_may_appear("AutoARFlow")
        super()._setup_prototype(*args, **kwargs)
        check_no_subsampled_latents(self.prototype_trace)
        self._model_arguments = (args, kwargs)
        self._argument_shapes = argument_shapes(args, kwargs)
        init_loc = self._init_loc()  # a fresh tensor (concatenated), never the user's
        self._slots = self._site_slots()
        global_index = global_positions(self._slots)
        init_globals = init_loc[global_index]
        self.global_dim = len(global_index)
        if self.global_dim:
            flow_name, flow_kwargs = self._flow_name, dict(self._flow_kwargs)
            if isinstance(flow_name, _DefaultFlow) and not flow_kwargs:
                flow_name, flow_kwargs = default_flow(self.global_dim)
            if flow_name in MASKED_FLOWS and "hidden_dims" not in flow_kwargs:
                flow_kwargs["hidden_dims"] = [max(3 * self.global_dim + 1, MIN_MASKED_WIDTH)]
            self.flow = build_flow(flow_name, self.global_dim, self._num_flows, **flow_kwargs).to(
                dtype=init_loc.dtype, device=init_loc.device
            )
            self._warn_if_large(init_loc.element_size())
            self.loc = PyroParam(init_globals, constraints.real)
            self.scale = PyroParam(
                torch.full_like(init_globals, self._init_scale), constraints.softplus_positive
            )
        path_slots = [slot for slot in self._slots if slot.global_start is None]
        if path_slots:
            origin = init_globals if self.global_dim else None
            self.paths = nn.ModuleList(
                self._path_residual(self.prototype_trace.nodes[slot.name], origin)
                for slot in path_slots
            )
            if self._paths == "laplace":  # fail now, not at a step, where it cannot be Markov
                residuals = dict(zip((slot.name for slot in path_slots), self.paths, strict=True))
                values = self._constrain(init_loc)
                initial = {name: values[name] for name in values if name not in residuals}
                with torch.no_grad():
                    conditional_laplace(
                        self._plain_model[0], args, kwargs, residuals, initial, torch.Size(), True
                    )

    def _warn_if_large(self, bytes_per_parameter: int) -> None:
        count = sum(parameter.numel() for parameter in self.flow.parameters())
        megabytes = count * bytes_per_parameter / 2**20
        if megabytes > LARGE_FLOW_MB:
            warnings.warn(
                f"AutoARFlow's {self._flow_name!r} flow over {self.global_dim} latents holds "
                f"{count / 1e6:.0f}M parameters ({megabytes:.0f} MB; its default width grows "
                "with the number of latents). Declare latent paths with af.GaussianPath (they "
                "then leave the flow), leave flow at its default (it adapts to the number of "
                "latents), or pass flow='iaf-conv' or narrower hidden_dims",
                UserWarning,
                stacklevel=4,
            )

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.prototype_trace is not None:
            self._check_same_latents(args, kwargs)
        return super().forward(*args, **kwargs)

    def _check_same_latents(self, args: tuple, kwargs: dict) -> None:
        """``ValueError`` if these model arguments give latent sites of other shapes than the
        guide was built for. The model is traced only when the arguments' shapes changed."""
        shapes = argument_shapes(args, kwargs)
        if shapes == self._argument_shapes:
            return
        with rng_state_kept(), torch.no_grad(), poutine.block():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            now = trace.nodes.get(name)
            if now is None or now["value"].shape != site["value"].shape:
                got = "no such site" if now is None else f"shape {tuple(now['value'].shape)}"
                raise ValueError(
                    f"with these arguments the model's latent site {name!r} has {got}, but "
                    f"this guide was built for shape {tuple(site['value'].shape)}: a guide "
                    "fits one set of latent shapes. Build a new guide (after "
                    "pyro.clear_param_store()) for the new shapes"
                )
        self._argument_shapes = shapes

    def _site_slots(self) -> list[SiteSlot]:
        """Each latent site's place in the latent vector; a ``GaussianPath`` site is a path
        (with ``paths="prior"``), every other a global."""
        slots, start, global_start = [], 0, 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            is_path = self._paths != "flat" and isinstance(site["fn"], GaussianPath)
            if is_path and any(frame.vectorized for frame in site["cond_indep_stack"]):
                raise ValueError(
                    f"the GaussianPath site {name!r} lies in the plate "
                    f"{site['cond_indep_stack'][0].name!r}: prior-structured paths in plates "
                    "(one path per member) are not supported yet. Use paths='flat', or a "
                    "GaussianPath whose states are vectors over the members"
                )
            slots.append(
                SiteSlot(
                    name, start, size, shape, site["fn"].support, None if is_path else global_start
                )
            )
            start += size
            global_start += 0 if is_path else size
        return slots

    def _path_residual(self, site: dict, origin: Tensor | None) -> PathResidual:
        """The residual of one path site, zero: the guide's law of the path starts as the
        prior's at the initial globals, its median path the prior's noise-free one."""
        prior = site["fn"]
        with torch.no_grad():
            skeleton = PathFlow(prior)(torch.zeros_like(site["value"]))
        vector_state = len(prior.state_shape) == 1
        reference = skeleton.movedim(-prior.event_dim, 0)
        return PathResidual(
            reference, vector_state, origin, self._path_hidden_dim, self._paths == "laplace"
        )

    def get_base_dist(self) -> dist.TorchDistribution:
        zeros = self._latent_template().new_zeros(self.latent_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def _latent_template(self) -> Tensor:
        """A tensor of the guide's dtype and device."""
        return next(iter(self.prototype_trace.iter_stochastic_nodes()))[1]["value"]

    def _globals_parts(self) -> list[torch.distributions.Transform]:
        """The globals' flow (its layers cached) then the cached affine map: scoring the
        guide's own sample walks back through the caches instead of running an IAF's
        sequential inverse."""
        loc, scale = self.loc, self.scale
        for name, value in (("loc", loc), ("scale", scale)):
            if value.shape != (self.global_dim,):
                raise ValueError(
                    f"Pyro's param store holds {store_name(self, name)!r} with shape "
                    f"{tuple(value.shape)}, but this guide's flow has "
                    f"{self.global_dim} entries: autoguides of one class share their "
                    "parameters by name. pyro.clear_param_store() before fitting another model"
                )
            check_finite(
                value,
                lambda name=name: (
                    f"AutoARFlow's {name} is not finite: training has diverged. "
                    "Lower the learning rate or clip the gradients, e.g. "
                    "pyro.optim.ClippedAdam({'lr': 1e-3, 'clip_norm': 10.0})"
                ),
            )
        flow = synced_child(self, "flow")
        return [flow, AffineTransform(loc, scale, event_dim=1, cache_size=1)]

    def _has_paths(self) -> bool:
        return any(slot.global_start is None for slot in self._slots)

    def get_transform(self, *args: Any, **kwargs: Any) -> torch.distributions.Transform:
        """Noise to the unconstrained latent vector. With path sites it runs the model, with
        these arguments or, given none (as ``NeuTraReparam`` calls it), those of the last call."""
        if not self._has_paths():
            return torch.distributions.ComposeTransform(self._globals_parts())
        if args or kwargs or self._model_arguments is None:
            self._check_same_latents(args, kwargs)
            self._model_arguments = (args, kwargs)
        args, kwargs = self._model_arguments
        globals_transform = (
            torch.distributions.ComposeTransform(self._globals_parts()) if self.global_dim else None
        )
        paths = synced_child(self, "paths")
        names = [slot.name for slot in self._slots if slot.global_start is None]
        residuals = dict(zip(names, paths, strict=True))
        bases = (
            partial(conditional_laplace, self._plain_model[0], args, kwargs, residuals)
            if self._paths == "laplace"
            else None
        )
        return StructuredTransform(
            self._plain_model[0], args, kwargs, self._slots, globals_transform, residuals, bases
        )

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TorchDistribution:
        if not self._has_paths():
            posterior = dist.TransformedDistribution(self.get_base_dist(), self._globals_parts())
        else:
            posterior = dist.TransformedDistribution(
                self.get_base_dist(), [self.get_transform(*args, **kwargs)]
            )
        if not self.sticking_the_landing:
            return posterior
        if not self._has_paths():
            return StickingTheLanding(posterior, partial(self._globals_log_density, fixed=True))
        return StickingTheLanding(posterior, partial(self._paths_log_density_landing, posterior))

    def _globals_log_density(self, values: Tensor, fixed: bool = False) -> Tensor:
        """log q of the globals ``values`` under the flow and affine, scored afresh (an IAF's
        sequential direction, over the globals alone); ``fixed``: with every parameter
        detached, so that gradients reach it only through ``values``."""
        flow, affine = self._globals_parts()
        if fixed:
            affine = AffineTransform(affine.loc.detach(), affine.scale.detach(), event_dim=1)
        zeros = values.new_zeros(self.global_dim)
        base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
        with detached_parameters([flow] if fixed else []):
            return dist.TransformedDistribution(base, [flow, affine]).log_prob(values)

    def _paths_log_density_landing(self, posterior: Any, latent: Tensor) -> Tensor:
        """Sticking the landing for the globals of a guide with paths: the draw's own log q,
        less the globals' score term, ``log q_fixed(theta) - log q(theta)`` (zero in value).

        The paths keep the standard estimator. Their score term is not the trouble; their
        path term would be: read with the parameters held fixed, a path's density has
        gradient ``(x - mean) / scale^2`` in the path, which a draw of a small scale (the
        funnel's neck) sends past float32's range.
        """
        if not self.global_dim:
            return posterior.log_prob(latent)
        theta = latent[..., global_positions(self._slots)]
        held = self._globals_log_density(theta, fixed=True)
        return posterior.log_prob(latent) + held - self._globals_log_density(theta)

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        """Each site's constrained value from a latent vector, batched or not."""
        batch = latent.shape[:-1]
        return {
            slot.name: biject_to(slot.support)(
                latent[..., slot.start : slot.start + slot.size].reshape(
                    batch + slot.unconstrained_shape
                )
            )
            for slot in self._slots
        }

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The image of the base median :math:`z = 0`, per site, in constrained space.

        Works before the first guide call (flow = identity: ``init_loc_fn``'s point) and reads
        Pyro's param store, so it reflects a store just loaded with ``ParamStore.load``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._check_same_latents(args, kwargs)
        with module_context(self):
            transform = self.get_transform(*args, **kwargs)
            return self._constrain(transform(self._latent_template().new_zeros(self.latent_dim)))

    @torch.no_grad()
    def quantiles(
        self,
        quantiles: list[float] | Tensor,
        *args: Any,
        num_samples: int = 2000,
        seed: int = 0,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Marginal posterior quantiles per site, Monte Carlo over ``num_samples`` draws.

        The quantiles are taken of the constrained draws, site by site, so they are those of
        the guide's marginals for every constraint (simplex, ordered, correlation Cholesky,
        ...). The draws use their own seeded generator, so repeated calls agree and the
        global random state is left alone. Returns a dict of tensors of shape
        ``(len(quantiles),) + site_shape``. Like :meth:`median`, it works before the first
        guide call and reads the param store.
        """
        check_positive_int(num_samples, "num_samples")
        levels = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if not bool(((levels > 0) & (levels < 1)).all()):
            raise ValueError(f"quantiles must lie in (0, 1), got {levels.tolist()}")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._check_same_latents(args, kwargs)
        with module_context(self):
            transform = self.get_transform(*args, **kwargs)
            template = self._latent_template()
            generator = torch.Generator().manual_seed(seed)
            z = torch.randn(num_samples, self.latent_dim, generator=generator, dtype=template.dtype)
            draws = self._constrain(transform(z.to(template.device)))
        return {
            name: torch.quantile(value, levels.to(value), dim=0) for name, value in draws.items()
        }
