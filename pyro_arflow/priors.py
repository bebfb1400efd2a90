r"""``FlowPrior``: a trainable flow distribution to use as a prior inside a Pyro model.

.. math::

    p_\phi(z \mid c) = \mathcal{N}(f_\phi^{-1}(z; c); 0, I)\,
    \left|\det \frac{\partial f_\phi^{-1}}{\partial z}\right|

``pyro.sample("z", prior(context))`` scores ``z`` under the flow and trains :math:`\phi` with
the rest of the model. MAF is the default because a prior is scored on values it did not
sample (the guide's): MAF scores in one pass; IAF would need the sequential solve.
"""

from __future__ import annotations

import itertools
from typing import Any

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor

from ._checks import check_context
from ._params import synced_child
from .registry import build_flow

__all__ = ["FlowPrior"]


class FlowPrior(PyroModule):
    """A standard normal pushed through a registered flow; calling it returns the distribution.

    Arguments:
        input_dim: size of the latent vector (event dim 1).
        flow: a registered flow name; ``"maf"`` (default) or ``"maf-lstm"`` score in one pass.
        num_flows: number of flow layers.
        context_dim: size of a context vector for a conditional prior, or ``None``.
        name: the name of this prior's parameters in Pyro's param store. Two priors share
            parameters exactly when they have the same name, so leave it out for independent
            priors (each gets a fresh name: ``FlowPrior``, ``FlowPrior_1``, ... in creation
            order) and give one to share, or to reload a param store saved by another run. As
            for every PyroModule, a prior that is an attribute of another PyroModule is named by
            its path there instead.
        flow_kwargs: passed to :func:`~pyro_arflow.build_flow`.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> prior = af.FlowPrior(4, context_dim=2, hidden_dims=[16])
        >>> def model(c):
        ...     z = pyro.sample("z", prior(c))
        ...     pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=torch.zeros(4))
        >>> prior(torch.randn(2)).log_prob(torch.randn(4)).shape
        torch.Size([])
    """

    _base_loc: Tensor
    _base_scale: Tensor

    def __init__(
        self,
        input_dim: int,
        flow: str = "maf",
        num_flows: int = 2,
        context_dim: int | None = None,
        *,
        name: str | None = None,
        **flow_kwargs: Any,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name or "$$$" in name):
            raise ValueError(f"name must be a non-empty string without '$$$', got {name!r}")
        super().__init__(name=_fresh_name() if name is None else name)
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.flow = build_flow(flow, input_dim, num_flows, context_dim, **flow_kwargs)
        self.register_buffer("_base_loc", torch.zeros(input_dim))
        self.register_buffer("_base_scale", torch.ones(input_dim))

    def forward(self, context: Tensor | None = None) -> dist.TransformedDistribution:
        check_context(context, self.context_dim, self._base_loc)
        base = dist.Normal(self._base_loc, self._base_scale)
        flow = synced_child(self, "flow")
        if context is None:
            return dist.TransformedDistribution(base.to_event(1), [flow])
        base = base.expand(context.shape[:-1] + (self.input_dim,)).to_event(1)
        return dist.TransformedDistribution(base, [flow.condition(context)])


_instances = itertools.count()


def _fresh_name() -> str:
    index = next(_instances)
    return "FlowPrior" if index == 0 else f"FlowPrior_{index}"
