r"""IAF and MAF layers: one affine autoregressive map, read in two directions.

A layer maps its input :math:`x` (base side) to its output :math:`y` (target side) by

.. math::

    y_i = \mu_i + \sigma_i x_i, \qquad \log\left|\det \frac{\partial y}{\partial x}\right|
    = \sum_i \log \sigma_i,

where :math:`(\mu_i, \sigma_i)` come from a conditioner reading the entries before :math:`i`
(in the conditioner's order) of one of the two vectors:

========  ==============  ==========================  ==========================
layer     network reads   :math:`x \to y` (``_call``)  :math:`y \to x` (``_inverse``)
========  ==============  ==========================  ==========================
IAF       :math:`x`       one pass                     sequential solve
MAF       :math:`y`       sequential solve             one pass
========  ==============  ==========================  ==========================

IAF: Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow",
https://arxiv.org/abs/1606.04934. MAF: Papamakarios et al. 2017, "Masked Autoregressive Flow
for Density Estimation", https://arxiv.org/abs/1705.07057.

Every transform here computes a value together with its log-determinant and keeps one cache,
the last ``(x, y, log|det dy/dx|)`` it computed: ``log_abs_det_jacobian`` on that pair costs
nothing, and with ``cache_size=1`` (the default) the pair also answers ``t(x)`` and
``t.inv(y)``. The cache is dropped by pickling and ``copy.deepcopy``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform

from ._checks import check_finite
from .conditioners import Conditioner, make_conditioner, resolve_order
from .scales import ScaleMap, make_scale_map

__all__ = [
    "AffineAutoregressive",
    "AffineSolve",
    "ConditionalAffineAutoregressive",
    "ConditionalIAF",
    "ConditionalMAF",
    "ConditionedAffineAutoregressive",
    "IAF",
    "MAF",
    "Permutation",
    "conditional_iaf",
    "conditional_maf",
    "iaf",
    "maf",
]


class _LastPair:
    """Mixin for a ``Transform``: value and log-determinant computed together, one cache.

    Subclasses implement ``_call_with_log_det(x) -> (y, log_det)``, ``_inverse_with_log_det(y)
    -> (x, log_det)`` and ``_log_det(x, y)``, where ``log_det`` is always that of ``x -> y``.
    """

    _last: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        last = self._last
        if self._cache_size and last is not None and last[0] is x:  # type: ignore[attr-defined]
            return last[1]
        y, log_det = self._call_with_log_det(x)
        self._last = (x, y, log_det)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        last = self._last
        if self._cache_size and last is not None and last[1] is y:  # type: ignore[attr-defined]
            return last[0]
        x, log_det = self._inverse_with_log_det(y)
        self._last = (x, y, log_det)
        return x

    def _call(self, x: Tensor) -> Tensor:
        return self._call_with_log_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_with_log_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] is y:
            return last[2]
        return self._log_det(x, y)

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_last", None)
        return state


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


class _AffineArithmetic(_LastPair):
    r"""The map :math:`y = \mu + \sigma x` and its inverse, shared by every layer class.

    Concrete classes set ``conditioner``, ``scale_map``, ``reads_output`` and ``context``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    autoregressive = True

    conditioner: Conditioner
    scale_map: ScaleMap
    reads_output: bool
    context: Tensor | None

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, forward=True)

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(y, forward=False)

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        value = y if self.reads_output else x
        _, raw_scale = self.conditioner(value, self.context)
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
        if forward != self.reads_output:
            loc, raw_scale = self.conditioner(value, self.context)
            scale, log_scale = self.scale_map(raw_scale)
            result = torch.addcmul(loc, scale, value) if forward else (value - loc) / scale
            direction = "one-pass direction"
        else:
            solve = AffineSolve(self.scale_map, forward)
            result, _, raw_scale = self.conditioner.recur(value, solve, self.context)
            log_scale = self.scale_map(raw_scale)[1]
            direction = "sequential direction"
        check_finite(result, self._non_finite_message(value, direction))
        return result, log_scale.sum(-1)

    def _non_finite_message(self, value: Tensor, what: str) -> Callable[[], str]:
        """The message of a non-finite result, built only if one occurs: the input, the
        context, diverged parameters or an overflow. It holds weak references to the tensors,
        since a deferred check on the GPU may build it a few calls later."""
        inputs = [(weakref.ref(value), "input")]
        if self.context is not None:
            inputs.append((weakref.ref(self.context), "context"))
        dtype = value.dtype
        return lambda: self._diagnose(inputs, what, dtype)

    def _diagnose(self, inputs: list[tuple[Any, str]], what: str, dtype: torch.dtype) -> str:
        name = f"{type(self).__name__} layer (input_dim={self.conditioner.input_dim})"
        gone = []
        for reference, label in inputs:
            given = reference()
            if given is None:
                gone.append(label)  # freed before a deferred (GPU) check could look at it
            elif not bool(torch.isfinite(given).all()):
                return f"the {name} got an {label} with non-finite entries (nan or inf)"
        diverged = [
            parameter_name
            for parameter_name, parameter in self.conditioner.named_parameters()
            if not bool(torch.isfinite(parameter).all())
        ]
        if diverged:
            return (
                f"the {name} has non-finite parameters ({', '.join(diverged)}): training has "
                "diverged. Lower the learning rate or clip the gradients, e.g. "
                "pyro.optim.ClippedAdam({'lr': 1e-3, 'clip_norm': 10.0})"
            )
        if gone:
            return (
                f"the {name} produced non-finite values in its {what}; its {' and '.join(gone)} "
                "had been freed before the check could tell whether they were finite"
            )
        return (
            f"the {name} produced non-finite values in its {what} from a finite input: they "
            f"overflow {dtype}; use float64, or inputs of a smaller scale"
        )


class AffineAutoregressive(_AffineArithmetic, TransformModule):
    """A Gaussian autoregressive layer with trainable conditioner; see :class:`IAF`, :class:`MAF`.

    Arguments:
        conditioner: the network computing ``(loc, raw_scale)``.
        scale_map: ``"softplus"``, ``"exp"``, ``"sigmoid"`` or a :class:`ScaleMap`.
        cache_size: 0 or 1, as for any ``torch.distributions.Transform``.
    """

    def __init__(
        self,
        conditioner: Conditioner,
        scale_map: str | ScaleMap = "softplus",
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if conditioner.context_dim is not None:
            raise ValueError(
                f"{type(self).__name__} needs a conditioner without context, got context_dim="
                f"{conditioner.context_dim}; use the conditional layer instead"
            )
        self.conditioner = conditioner
        self.scale_map = make_scale_map(scale_map)
        self.context = None

    def with_cache(self, cache_size: int = 1) -> AffineAutoregressive:
        if cache_size == self._cache_size:
            return self
        return type(self)(self.conditioner, self.scale_map, cache_size=cache_size)

    @property
    def input_dim(self) -> int:
        return self.conditioner.input_dim


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


class ConditionedAffineAutoregressive(_AffineArithmetic, Transform):
    """A conditional layer bound to one context: what ``ConditionalIAF/MAF.condition`` returns.

    It holds no parameters of its own; they stay with the conditional module.
    """

    def __init__(
        self,
        conditioner: Conditioner,
        scale_map: ScaleMap,
        reads_output: bool,
        context: Tensor,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.conditioner = conditioner
        self.scale_map = scale_map
        self.reads_output = reads_output
        self.context = context

    def with_cache(self, cache_size: int = 1) -> ConditionedAffineAutoregressive:
        if cache_size == self._cache_size:
            return self
        return ConditionedAffineAutoregressive(
            self.conditioner, self.scale_map, self.reads_output, self.context, cache_size
        )


class ConditionalAffineAutoregressive(ConditionalTransformModule):
    """A Gaussian autoregressive layer whose conditioner also reads a context vector.

    ``condition(context)`` returns the layer for that context, following Pyro's
    ``ConditionalTransformModule`` convention.

    Arguments:
        conditioner: a network built with ``context_dim``.
        scale_map: ``"softplus"``, ``"exp"``, ``"sigmoid"`` or a :class:`ScaleMap`.
    """

    reads_output: bool
    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, conditioner: Conditioner, scale_map: str | ScaleMap = "softplus") -> None:
        super().__init__()
        if conditioner.context_dim is None:
            raise ValueError(
                f"{type(self).__name__} needs a conditioner built with context_dim, got None"
            )
        self.conditioner = conditioner
        self.scale_map = make_scale_map(scale_map)

    def condition(self, context: Tensor) -> ConditionedAffineAutoregressive:
        return ConditionedAffineAutoregressive(
            self.conditioner, self.scale_map, self.reads_output, context
        )

    @property
    def input_dim(self) -> int:
        return self.conditioner.input_dim

    @property
    def context_dim(self) -> int:
        return self.conditioner.context_dim  # type: ignore[return-value]


class ConditionalIAF(ConditionalAffineAutoregressive):
    r"""IAF whose :math:`(\mu_i, \sigma_i)` also read a context :math:`c`: amortized guides.

    Built by :func:`conditional_iaf` (whose example shows one in use).
    """

    reads_output = False


class ConditionalMAF(ConditionalAffineAutoregressive):
    r"""MAF whose :math:`(\mu_i, \sigma_i)` also read a context :math:`c`: conditional priors.

    Built by :func:`conditional_maf` (whose example shows one in use).
    """

    reads_output = True


class Permutation(_LastPair, TransformModule):
    r"""Reorders the last dimension: ``y = x[..., permutation]``; volume preserving.

    Its ``sign``, the sign of :math:`\det \partial y / \partial x`, is the permutation's
    parity. The permutation is a buffer, so it follows ``.to()`` and survives ``state_dict``.
    The built-in flows never need it (each layer takes its own order); ``build_flow`` puts it
    between the layers of a registered flow that takes no ``ordering``.

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
        permutation = resolve_order(len(permutation), permutation).to(torch.empty(0).device)
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

    def with_cache(self, cache_size: int = 1) -> Permutation:
        if cache_size == self._cache_size:
            return self
        return Permutation(self.permutation, cache_size=cache_size)


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
) -> ConditionalIAF:
    """One conditional IAF layer reading a context of size ``context_dim``.

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.conditional_iaf(4, context_dim=3, hidden_dims=[16])
        >>> bound = layer.condition(torch.randn(3))  # an IAF layer for this context
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(bound.inv(bound(x)), x, atol=1e-5)
        True
    """
    return ConditionalIAF(
        make_conditioner(conditioner, input_dim, context_dim, **kwargs), scale_map
    )


def conditional_maf(
    input_dim: int,
    context_dim: int,
    conditioner: str = "masked",
    scale_map: str | ScaleMap = "softplus",
    **kwargs: Any,
) -> ConditionalMAF:
    """One conditional MAF layer reading a context of size ``context_dim``.

    Example::

        >>> import torch, pyro.distributions as dist, pyro_arflow as af
        >>> layer = af.conditional_maf(4, context_dim=3, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
        >>> prior = dist.TransformedDistribution(base, [layer.condition(torch.randn(3))])
        >>> prior.log_prob(torch.randn(2, 4)).shape
        torch.Size([2])
    """
    return ConditionalMAF(
        make_conditioner(conditioner, input_dim, context_dim, **kwargs), scale_map
    )
