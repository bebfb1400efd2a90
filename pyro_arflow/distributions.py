r"""The Gaussian autoregressive model as a distribution, and as the flow it is.

.. math::

    p(x) = \prod_{i} \mathcal{N}\!\left(x_i \mid \mu_i(x_{<i}),\ \sigma_i(x_{<i})^2\right)

Scoring reads :math:`x` once through the conditioner; sampling draws :math:`z \sim
\mathcal{N}(0, I)` and solves :math:`x_i = \mu_i + \sigma_i z_i` in order. The same density is
that of :math:`\mathcal{N}(0, I)` pushed through a MAF layer sharing the conditioner:
:meth:`GaussianAutoregressive.as_flow` returns exactly that.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Normal, TorchDistribution, TransformedDistribution, constraints
from torch import Size, Tensor

from .conditioners import Conditioner
from .scales import ScaleMap, make_scale_map
from .transforms import MAF
from .validation import check_finite

__all__ = ["GaussianAutoregressive"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class GaussianAutoregressive(TorchDistribution):
    """A Gaussian autoregressive model over vectors of size ``conditioner.input_dim``.

    Arguments:
        conditioner: the network computing each position's ``(loc, raw_scale)`` from the
            positions before it; its parameters belong to whoever owns it (register it with
            ``pyro.module`` in a model or guide).
        context: optional context for a conditional network; its leading dims are the batch shape.
        scale_map: ``"softplus"``, ``"exp"``, ``"sigmoid"`` or a :class:`ScaleMap`.

    Example::

        >>> import torch, pyro_arflow as af
        >>> from pyro_arflow.conditioners import LSTMConditioner
        >>> p = af.GaussianAutoregressive(LSTMConditioner(20, hidden_size=16))
        >>> x = p.rsample((4,))
        >>> torch.allclose(p.log_prob(x), p.as_flow().log_prob(x), atol=1e-5)
        True
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        conditioner: Conditioner,
        context: Tensor | None = None,
        scale_map: str | ScaleMap = "softplus",
        validate_args: bool | None = None,
    ) -> None:
        if (context is None) != (conditioner.context_dim is None):
            raise ValueError(
                f"the conditioner expects context_dim={conditioner.context_dim}, "
                f"got context {'None' if context is None else tuple(context.shape)}"
            )
        self.conditioner = conditioner
        self.context = context
        self.scale_map = make_scale_map(scale_map)
        batch_shape = Size() if context is None else context.shape[:-1]
        super().__init__(batch_shape, Size([conditioner.input_dim]), validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        check_finite(value, lambda: "value has non-finite entries (nan or inf)")
        loc, raw_scale = self.conditioner(value, self.context)
        scale, log_scale = self.scale_map(raw_scale)
        z = (value - loc) / scale
        log_density = (-0.5 * z.square() - _HALF_LOG_2PI - log_scale).sum(-1)
        return log_density.expand(torch.broadcast_shapes(log_density.shape, self.batch_shape))

    def rsample(self, sample_shape: Size = Size()) -> Tensor:
        template = next(self.conditioner.parameters())
        z = torch.randn(
            self._extended_shape(sample_shape), dtype=template.dtype, device=template.device
        )
        return self._maf_layer()(z)  # x_i = mu_i + sigma_i z_i, solved in order

    def as_flow(self) -> TransformedDistribution:
        """The same density as a standard normal pushed through a MAF layer sharing the network."""
        template = next(self.conditioner.parameters())
        base = (
            Normal(template.new_zeros(()), template.new_ones(()))
            .expand(self.batch_shape + self.event_shape)
            .to_event(1)
        )
        return TransformedDistribution(base, [self._maf_layer()])

    def _maf_layer(self) -> MAF:
        """A MAF layer sharing the conditioner, bound to the context (if any)."""
        return MAF(self.conditioner, self.scale_map, context=self.context)

    def expand(self, batch_shape: Size, _instance=None) -> GaussianAutoregressive:
        new = self._get_checked_instance(GaussianAutoregressive, _instance)
        batch_shape = Size(batch_shape)
        new.conditioner = self.conditioner
        new.scale_map = self.scale_map
        new.context = None if self.context is None else self.context.expand(batch_shape + (-1,))
        super(GaussianAutoregressive, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new
