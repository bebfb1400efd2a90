r"""The linear Gaussian autoregression as a layer: a MAF layer with a linear conditioner and
unit scales, whose sequential direction is one triangular solve.

.. math::

    y_i = x_i + \sum_{j <_o i} B_{ij}\, y_j
    \quad\Longleftrightarrow\quad (I - B)\, y = x, \qquad
    \log\left|\det \frac{\partial y}{\partial x}\right| = 0,

with :math:`B` strictly lower triangular in the layer's order :math:`o`. Both directions are
one call: :math:`x = (I - B) y` a matrix product, :math:`y = (I - B)^{-1} x` a triangular
solve (BLAS ``trsm``), :math:`O(D^2)` per vector either way.

Why an IAF guide wants it: the posterior of a latent Markov path (an AR(1) log-volatility, a
random-walk level) has a banded *precision*: each :math:`y_i` depends on its neighbours only.
An IAF layer reads its input, so to give :math:`y_i` a dependence :math:`\rho` on
:math:`y_{i-1}` its network must learn the whole dense triangle :math:`\rho^{i-j}` on the
inputs, :math:`O(D^2)` small weights with noisy gradients (a full-rank Gaussian guide learns
the same dense Cholesky factor, and is as slow). Here the same dependence is the single
weight :math:`B_{i,i-1}`. The LSTM conditioner has it built in (a recurrent state is such a
filter); the masked one does not, which is why ``"iaf"`` follows each IAF layer with this one.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from ._checks import check_event
from .conditioners import Ordering, resolve_order
from .transforms import _LastPair

__all__ = ["LinearAutoregression", "linear_autoregression"]


class LinearAutoregression(_LastPair, TransformModule):
    r""":math:`y = (I - B)^{-1} x`, :math:`B` strictly lower triangular in ``ordering``.

    Arguments:
        input_dim: ``D``.
        ordering: ``"natural"``, ``"reversed"``, ``"random"`` (with ``seed``) or a permutation;
            :math:`y_i` reads the :math:`y_j` before it in this order.
        seed: seed of a random ordering.
        cache_size: 0 or 1, as for any ``torch.distributions.Transform``.

    ``weight`` (:math:`B` in the order's coordinates, shape ``(D, D)``; only its strictly lower
    triangle is used) starts at zero: the layer starts as the identity. It is volume
    preserving, so it changes no log-density by itself; it lets the layers around it spend
    their capacity on what is not a linear autoregression.

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.linear_autoregression(4)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(layer.inv(layer(x)), x)
        True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    volume_preserving = True
    autoregressive = True

    order: Tensor
    rank: Tensor

    def __init__(
        self, input_dim: int, ordering: Ordering = "natural", seed: int = 0, cache_size: int = 1
    ) -> None:
        super().__init__(cache_size=cache_size)
        order = resolve_order(input_dim, ordering, seed).to(torch.empty(0).device)
        self.input_dim = len(order)
        self.register_buffer("order", order)
        self.register_buffer("rank", torch.empty_like(order), persistent=False)
        self._natural = False
        _rebuild_after_load(self, None)
        self.register_load_state_dict_post_hook(_rebuild_after_load)
        self.weight = nn.Parameter(torch.zeros(self.input_dim, self.input_dim))

    def _unit_upper(self) -> Tensor:
        r""":math:`(I - B)^\top` in the order's coordinates: unit upper triangular (the rest of
        ``weight`` is masked out, so it never receives a gradient)."""
        upper = self.weight.t().triu(1).neg()
        upper.diagonal().add_(1.0)  # in place on a fresh tensor: autograd allows it
        return upper

    def _in_order(self, value: Tensor) -> tuple[Tensor, torch.Size]:
        check_event(value, self.input_dim, "input", self.weight, finite=False)
        batch_shape = value.shape[:-1]
        if not self._natural:
            value = value[..., self.order]
        return value.reshape(-1, self.input_dim), batch_shape

    def _back(self, value: Tensor, batch_shape: torch.Size) -> Tensor:
        if not self._natural:
            value = value[..., self.rank]
        return value.reshape(batch_shape + (self.input_dim,))

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rows, batch_shape = self._in_order(x)
        # the rows of y solve y (I - B)^T = x
        y = torch.linalg.solve_triangular(
            self._unit_upper(), rows, upper=True, left=False, unitriangular=True
        )
        return self._back(y, batch_shape), x.new_zeros(batch_shape)

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        rows, batch_shape = self._in_order(y)
        x = rows @ self._unit_upper()
        return self._back(x, batch_shape), y.new_zeros(batch_shape)

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])

    def with_cache(self, cache_size: int = 1) -> LinearAutoregression:
        if cache_size == self._cache_size:
            return self
        twin = LinearAutoregression(self.input_dim, self.order, cache_size=cache_size)
        twin.weight = self.weight  # the same parameter, not a copy
        return twin.to(self.order.device)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


def linear_autoregression(
    input_dim: int, ordering: Ordering = "natural", seed: int = 0
) -> LinearAutoregression:
    """One :class:`LinearAutoregression` layer."""
    return LinearAutoregression(input_dim, ordering, seed)


def _rebuild_after_load(module: LinearAutoregression, incompatible_keys: object) -> None:
    """Derive ``rank`` and whether the order is the identity from ``order``: at construction,
    and again when a loaded state dict brings another order."""
    module.rank.copy_(torch.argsort(module.order))
    arange = torch.arange(module.input_dim, device=module.order.device)
    module._natural = bool((module.order == arange).all())
