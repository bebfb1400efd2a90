r"""IAF and MAF layers: one affine autoregressive map, read in two directions.

A layer maps its input :math:`x` (base side) to its output :math:`y` (target side) by

.. math::

    y_i = \mu_i + \sigma_i x_i, \qquad \log\left|\det \frac{\partial y}{\partial x}\right|
    = \sum_i \log \sigma_i,

where :math:`(\mu_i, \sigma_i)` come from a conditioner reading the entries before :math:`i`
(in the conditioner's order) of one of the two vectors:

========  ==============  ============================  ===============================
layer     network reads   :math:`x \to y` (``_call``)   :math:`y \to x` (``_inverse``)
========  ==============  ============================  ===============================
IAF       :math:`x`       one pass                      sequential solve
MAF       :math:`y`       sequential solve              one pass
========  ==============  ============================  ===============================

IAF: Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow",
https://arxiv.org/abs/1606.04934. MAF: Papamakarios et al. 2017, "Masked Autoregressive Flow
for Density Estimation", https://arxiv.org/abs/1705.07057.

One class serves both plain and conditional layers: a layer whose conditioner reads a context
(built with ``context_dim``) is a ``ConditionalTransformModule`` too, and
``layer.condition(context)`` returns the same kind of layer bound to that context, sharing its
parameters (Pyro's convention); for a layer without context it returns the layer itself. Every
layer is a :class:`~pyro_arflow.cached.CachedTransform`: it computes its value and
log-determinant together and keeps the last pair.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor

from .cached import CachedTransform
from .conditioners import Conditioner, make_conditioner
from .ordering import resolve_ordering
from .scales import ScaleMap, make_scale_map
from .validation import check_finite, non_finite_message

__all__ = [
    "AffineAutoregressive",
    "AffineSolve",
    "IAF",
    "MAF",
    "Permutation",
    "conditional_iaf",
    "conditional_maf",
    "iaf",
    "maf",
]


@dataclass(frozen=True)
class AffineSolve:
    r"""One position of the sequential solve: :math:`y = \mu + \sigma w` (``forward``) or
    :math:`x = (w - \mu) / \sigma`, :math:`\sigma` from ``scale_map``. A value, so that equal
    solves are one key of a conditioner's CUDA graphs."""

    scale_map: ScaleMap
    forward: bool

    def __call__(self, loc: Tensor, raw_scale: Tensor, w: Tensor) -> Tensor:
        scale = self.scale_map(raw_scale)[0]
        return torch.addcmul(loc, scale, w) if self.forward else (w - loc) / scale


class AffineAutoregressive(CachedTransform, TransformModule, ConditionalTransformModule):
    r"""A Gaussian autoregressive layer :math:`y = \mu + \sigma x`; see :class:`IAF`, :class:`MAF`.

    Arguments:
        conditioner: the network computing ``(loc, raw_scale)``; built with ``context_dim``,
            it makes the layer conditional.
        scale_map: ``"softplus"``, ``"exp"``, ``"sigmoid"`` or a :class:`ScaleMap`.
        cache_size: 0 or 1, as for any ``torch.distributions.Transform``.
        context: the context a conditional layer is bound to; usually set by
            :meth:`condition`, not by hand.

    Subclasses set ``reads_output``: whether the network reads the layer's output (MAF) or
    its input (IAF).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    autoregressive = True

    reads_output: bool

    def __init__(
        self,
        conditioner: Conditioner,
        scale_map: str | ScaleMap = "softplus",
        cache_size: int = 1,
        context: Tensor | None = None,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if context is not None and conditioner.context_dim is None:
            raise ValueError(
                f"{type(self).__name__} got a context, but its conditioner takes none (build it "
                "with context_dim)"
            )
        self.conditioner = conditioner
        self.scale_map = make_scale_map(scale_map)
        self.context = context

    def condition(self, context: Tensor) -> AffineAutoregressive:
        """This layer bound to ``context``: the same class, sharing the conditioner (so its
        parameters); the layer itself if it takes no context."""
        if self.conditioner.context_dim is None:
            return self
        return type(self)(self.conditioner, self.scale_map, self._cache_size, context)

    @property
    def input_dim(self) -> int:
        return self.conditioner.input_dim

    @property
    def context_dim(self) -> int | None:
        return self.conditioner.context_dim

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, forward=True)

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(y, forward=False)

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        value = y if self.reads_output else x
        _, raw_scale = self.conditioner(value, self._bound_context())
        log_det = self.scale_map(raw_scale)[1].sum(-1)
        check_finite(log_det, self._non_finite_message(value, "log-determinant"))
        return log_det

    def _transform(self, value: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        r""":math:`y = \mu + \sigma x` (``forward``) or :math:`x = (y - \mu) / \sigma`, and
        :math:`\sum_i \log \sigma_i`; in one pass when the network reads ``value``.

        One finiteness check, on the result: a non-finite input or context makes it
        non-finite too, and the message then says which of them, or the parameters, or an
        overflow, was the cause.
        """
        context = self._bound_context()
        if forward != self.reads_output:
            loc, raw_scale = self.conditioner(value, context)
            scale, log_scale = self.scale_map(raw_scale)
            result = torch.addcmul(loc, scale, value) if forward else (value - loc) / scale
            direction = "one-pass direction"
        else:
            solve = AffineSolve(self.scale_map, forward)
            result, _, raw_scale = self.conditioner.recur(value, solve, context)
            log_scale = self.scale_map(raw_scale)[1]
            direction = "sequential direction"
        check_finite(result, self._non_finite_message(value, direction))
        return result, log_scale.sum(-1)

    def _bound_context(self) -> Tensor | None:
        if self.context is None and self.conditioner.context_dim is not None:
            raise ValueError(
                f"this {type(self).__name__} layer reads a context of size "
                f"{self.conditioner.context_dim}: use layer.condition(context)"
            )
        return self.context

    def _non_finite_message(self, value: Tensor, what: str) -> Callable[[], str]:
        name = f"{type(self).__name__} layer (input_dim={self.input_dim})"
        inputs = {"input": value, "context": self.context}
        return non_finite_message(name, self.conditioner, inputs, what)

    def extra_repr(self) -> str:
        return "" if self.context is None else f"context shape={tuple(self.context.shape)}"


class IAF(AffineAutoregressive):
    r"""Inverse autoregressive flow layer: :math:`y_i = \mu_i(x_{<i}) + \sigma_i(x_{<i}) x_i`.

    Sampling and scoring its own samples take one network pass, which makes it the layer for
    variational guides; the inverse is a sequential solve. Kingma et al. 2016,
    https://arxiv.org/abs/1606.04934.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_arflow as af
        >>> flow = af.iaf(5, hidden_dims=[32, 32])
        >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(5), 1.0).to_event(1), [flow])
        >>> q.log_prob(q.rsample((3,))).shape
        torch.Size([3])
    """

    reads_output = False


class MAF(AffineAutoregressive):
    r"""Masked autoregressive flow layer: :math:`y_i = \mu_i(y_{<i}) + \sigma_i(y_{<i}) x_i`.

    Scoring given values takes one network pass, which makes it the layer for priors and
    density estimation; sampling is a sequential solve. Unlike ``AffineAutoregressive(...).inv``
    it is a module of its own, so its parameters are seen by optimizers and ``pyro.module``.
    Papamakarios et al. 2017, https://arxiv.org/abs/1705.07057.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_arflow as af
        >>> flow = af.maf(5, hidden_dims=[32, 32])
        >>> p = dist.TransformedDistribution(dist.Normal(torch.zeros(5), 1.0).to_event(1), [flow])
        >>> p.log_prob(torch.randn(3, 5)).shape
        torch.Size([3])
    """

    reads_output = True


class Permutation(CachedTransform, TransformModule):
    r"""Reorders the last dimension: ``y = x[..., permutation]``; volume preserving.

    Its ``sign``, the sign of :math:`\det \partial y / \partial x`, is the permutation's
    parity. The permutation is a buffer, so it follows ``.to()`` and survives ``state_dict``.
    The built-in flows never need it (each layer takes its own order); ``build_flow`` puts it
    between the layers of a registered flow that takes no ``ordering``. (It reorders values;
    an ordering, :mod:`pyro_arflow.ordering`, is the order in which a layer visits positions.)

    Example::

        >>> import torch, pyro_arflow as af
        >>> swap = af.Permutation(torch.tensor([1, 0, 2]))
        >>> swap(torch.tensor([1.0, 2.0, 3.0])), swap.sign
        (tensor([2., 1., 3.]), -1)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    volume_preserving = True

    permutation: Tensor
    inverse_permutation: Tensor

    def __init__(self, permutation: Tensor, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        permutation = resolve_ordering(len(permutation), permutation)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @property
    def sign(self) -> int:
        """+1 for an even permutation, -1 for an odd one (parity by its cycle lengths)."""
        order, seen, transpositions = self.permutation.tolist(), set(), 0
        for start in range(len(order)):
            length, position = 0, start
            while position not in seen:
                seen.add(position)
                position, length = order[position], length + 1
            transpositions += max(length - 1, 0)
        return -1 if transpositions % 2 else +1

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])


def iaf(
    input_dim: int,
    conditioner: str = "masked",
    scale_map: str | ScaleMap = "softplus",
    **kwargs: Any,
) -> IAF:
    """One IAF layer; ``kwargs`` go to the conditioner (``hidden_dims``, ``ordering``, ...).

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.iaf(6, conditioner="lstm", hidden_size=8)
        >>> x = torch.randn(4, 6)
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True
    """
    return IAF(make_conditioner(conditioner, input_dim, **kwargs), scale_map)


def maf(
    input_dim: int,
    conditioner: str = "masked",
    scale_map: str | ScaleMap = "softplus",
    **kwargs: Any,
) -> MAF:
    """One MAF layer; ``kwargs`` go to the conditioner (``hidden_dims``, ``ordering``, ...).

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.maf(6, hidden_dims=[16], ordering="reversed")
        >>> layer(torch.randn(4, 6)).shape  # the sequential direction
        torch.Size([4, 6])
    """
    return MAF(make_conditioner(conditioner, input_dim, **kwargs), scale_map)


def conditional_iaf(
    input_dim: int,
    context_dim: int,
    conditioner: str = "masked",
    scale_map: str | ScaleMap = "softplus",
    **kwargs: Any,
) -> IAF:
    """One IAF layer whose conditioner also reads a context of size ``context_dim``.

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.conditional_iaf(4, context_dim=3, hidden_dims=[16])
        >>> bound = layer.condition(torch.randn(3))  # an IAF layer for this context
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(bound.inv(bound(x)), x, atol=1e-5)
        True
    """
    return IAF(make_conditioner(conditioner, input_dim, context_dim, **kwargs), scale_map)


def conditional_maf(
    input_dim: int,
    context_dim: int,
    conditioner: str = "masked",
    scale_map: str | ScaleMap = "softplus",
    **kwargs: Any,
) -> MAF:
    """One MAF layer whose conditioner also reads a context of size ``context_dim``.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_arflow as af
        >>> layer = af.conditional_maf(4, context_dim=3, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
        >>> prior = dist.TransformedDistribution(base, [layer.condition(torch.randn(3))])
        >>> prior.log_prob(torch.randn(2, 4)).shape
        torch.Size([2])
    """
    return MAF(make_conditioner(conditioner, input_dim, context_dim, **kwargs), scale_map)


DEPRECATED_ALIASES: dict[str, type] = {
    "ConditionalAffineAutoregressive": AffineAutoregressive,
    "ConditionedAffineAutoregressive": AffineAutoregressive,
    "ConditionalIAF": IAF,
    "ConditionalMAF": MAF,
}
"""Class names of version 0.3, kept for one release: a layer's context is now optional."""


def deprecated_alias(name: str) -> type:
    """The class an old name stands for, with a ``FutureWarning`` saying what to use."""
    target = DEPRECATED_ALIASES[name]
    warnings.warn(
        f"pyro_arflow.{name} is deprecated and will be removed in the next release: use "
        f"{target.__name__}, whose conditioner takes an optional context (build it with "
        "context_dim, then layer.condition(context))",
        FutureWarning,
        stacklevel=3,
    )
    return target


def __getattr__(name: str) -> Any:
    if name in DEPRECATED_ALIASES:
        return deprecated_alias(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
