r"""``AutoARFlow``: an autoguide over a model's whole latent space, built from a registered flow.

The guide's density over the unconstrained, concatenated latent vector :math:`\theta` is

.. math::

    \theta = m + s \odot f(z), \qquad z \sim \mathcal{N}(0, I),

where :math:`f` is the flow (a stack of autoregressive layers that starts as the identity),
:math:`m` starts at the point of ``init_loc_fn`` and :math:`s` at ``init_scale``. At step 0
it therefore *is* ``AutoNormal`` started the same way, and training only adds what the flow
buys (Kingma et al. 2016 use IAF guides this way).
"""

from __future__ import annotations

import math
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import biject_to

from ._checks import check_finite, check_positive_int
from ._params import module_context, store_name, synced_child
from .distributed import check_lazy_parameters_may_appear
from .registry import build_flow

__all__ = ["AutoARFlow"]


class AutoARFlow(AutoContinuous):
    """A normalizing-flow autoguide: standard normal -> registered flow -> elementwise affine.

    Arguments:
        model: a Pyro model with continuous latent sites.
        flow: a registered flow name (``"iaf"``, ``"iaf-lstm"``, ``"maf"``, ``"maf-lstm"``, or
            a plugin's). IAF is the natural choice: sampling and scoring its own samples take
            one pass; MAF samples by a sequential solve.
        num_flows: number of flow layers.
        init_loc_fn: per-site initialization, as for every Pyro autoguide; unlike Pyro's
            ``AutoIAFNormal`` it is honoured.
        init_scale: initial scale of every unconstrained coordinate, finite and > 0.
        flow_kwargs: passed to :func:`~pyro_arflow.build_flow` (``hidden_dims``,
            ``hidden_size``, ``permutation``, ...). They are checked at construction, on a
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
        flow: str = "iaf",
        num_flows: int = 2,
        init_loc_fn: Any = init_to_median,
        init_scale: float = 0.1,
        **flow_kwargs: Any,
    ) -> None:
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
        build_flow(flow, 2, num_flows, **flow_kwargs)  # fail now, not at the first step
        self._flow_name = flow
        self._num_flows = num_flows
        self._init_scale = float(init_scale)
        self._flow_kwargs = flow_kwargs
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        check_lazy_parameters_may_appear("AutoARFlow")
        super()._setup_prototype(*args, **kwargs)
        init_loc = self._init_loc()  # a fresh tensor (concatenated), never the user's
        self.flow = build_flow(
            self._flow_name, self.latent_dim, self._num_flows, **self._flow_kwargs
        ).to(dtype=init_loc.dtype, device=init_loc.device)
        self.loc = PyroParam(init_loc, constraints.real)
        self.scale = PyroParam(
            torch.full_like(init_loc, self._init_scale), constraints.softplus_positive
        )

    def get_base_dist(self) -> dist.TorchDistribution:
        zeros = torch.zeros_like(self.loc)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def _parts(self) -> list[torch.distributions.Transform]:
        """The flow (its layers cached) then the cached affine map: scoring the guide's own
        sample walks back through the caches instead of running an IAF's sequential inverse."""
        loc, scale = self.loc, self.scale
        for name, value in (("loc", loc), ("scale", scale)):
            if value.shape != (self.latent_dim,):
                raise ValueError(
                    f"Pyro's param store holds {store_name(self, name)!r} with shape "
                    f"{tuple(value.shape)}, but this guide's latent vector has "
                    f"{self.latent_dim} entries: autoguides of one class share their "
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

    def get_transform(self, *args: Any, **kwargs: Any) -> torch.distributions.Transform:
        return torch.distributions.ComposeTransform(self._parts())

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        return dist.TransformedDistribution(self.get_base_dist(), self._parts())

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        return {
            site["name"]: biject_to(site["fn"].support)(unconstrained)
            for site, unconstrained in self._unpack_latent(latent)
        }

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The image of the base median :math:`z = 0`, per site, in constrained space.

        Works before the first guide call (flow = identity: ``init_loc_fn``'s point) and reads
        Pyro's param store, so it reflects a store just loaded with ``ParamStore.load``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with module_context(self):
            transform = self.get_transform()
            return self._constrain(transform(torch.zeros_like(self.loc)))

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

        The draws use their own seeded generator, so repeated calls agree and the global
        random state is left alone. Returns a dict of tensors of shape
        ``(len(quantiles),) + site_shape``. Like :meth:`median`, it works before the first
        guide call and reads the param store.
        """
        check_positive_int(num_samples, "num_samples")
        levels = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if not bool(((levels > 0) & (levels < 1)).all()):
            raise ValueError(f"quantiles must lie in (0, 1), got {levels.tolist()}")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with module_context(self):
            transform = self.get_transform()
            loc = self.loc
            generator = torch.Generator().manual_seed(seed)
            z = torch.randn(
                num_samples, self.latent_dim, generator=generator, dtype=loc.dtype, device="cpu"
            )
            latent = transform(z.to(loc.device))
        marginal = torch.quantile(latent, levels.to(latent), dim=0)
        per_level = [self._constrain(row) for row in marginal]
        return {name: torch.stack([row[name] for row in per_level]) for name in per_level[0]}
