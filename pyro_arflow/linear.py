r"""The linear Gaussian autoregression as a layer: a MAF layer with a linear conditioner and
unit scales, whose sequential direction is one triangular solve.

.. math::

    y_i = x_i + \sum_{j <_o i} B_{ij}\, y_j
    \quad\Longleftrightarrow\quad (I - B)\, y = x, \qquad
    \log\left|\det \frac{\partial y}{\partial x}\right| = 0,

with :math:`B` strictly lower triangular in the layer's ordering :math:`o`. Both directions
are one call: :math:`x = (I - B) y` a matrix product, :math:`y = (I - B)^{-1} x` a triangular
solve (BLAS ``trsm``), :math:`O(D^2)` per vector either way.

With ``bandwidth=k``, :math:`B` is banded: :math:`y_i` reads only the :math:`k` values before
it in the ordering, :math:`O(Dk)` parameters. Then :math:`x = (I - B) y` is :math:`k` shifted
products, and the solve runs over blocks of :math:`m = \max(k, 64)` positions: within a
block one :math:`m \times m` triangular solve, between blocks the last :math:`k` values carried
over, :math:`O(Dm)` work in :math:`D / m` steps.

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
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from ._checks import check_event, check_positive_int
from .cached import CachedTransform
from .ordering import Ordering, register_ordering, resolve_ordering

__all__ = ["LinearAutoregression", "linear_autoregression"]


class LinearAutoregression(CachedTransform, TransformModule):
    r""":math:`y = (I - B)^{-1} x`, :math:`B` strictly lower triangular in ``ordering``.

    Arguments:
        input_dim: ``D``.
        ordering: ``"natural"``, ``"reversed"``, ``"random"`` (with ``seed``) or a permutation;
            :math:`y_i` reads the :math:`y_j` before it in this order.
        seed: seed of a random ordering.
        cache_size: 0 or 1, as for any ``torch.distributions.Transform``.
        bandwidth: ``None`` (dense :math:`B`) or ``k``: :math:`y_i` reads only the ``k``
            values before it in the ordering.

    ``weight`` starts at zero: the layer starts as the identity. Dense, it is :math:`B` in the
    ordering's coordinates, shape ``(D, D)``, of which only the strictly lower triangle is
    used; banded, shape ``(D, k)``, ``weight[i, j]`` the coefficient of the value ``k - j``
    places before position ``i`` (its window, oldest first). It is volume
    preserving, so it changes no log-density by itself; it lets the layers around it spend
    their capacity on what is not a linear autoregression.

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.linear_autoregression(4)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(layer.inv(layer(x)), x)
        True
        >>> af.LinearAutoregression(10_000, bandwidth=2).weight.shape  # O(Dk), not O(D^2)
        torch.Size([10000, 2])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    volume_preserving = True
    autoregressive = True

    ordering: Tensor
    inverse_ordering: Tensor

    BLOCK = 64
    """Smallest block of the banded solve."""

    def __init__(
        self,
        input_dim: int,
        ordering: Ordering = "natural",
        seed: int = 0,
        cache_size: int = 1,
        bandwidth: int | None = None,
    ) -> None:
        super().__init__(cache_size=cache_size)
        register_ordering(self, resolve_ordering(input_dim, ordering, seed))
        self.input_dim = input_dim
        self._ordering_loaded()
        self.bandwidth = None if bandwidth is None else check_positive_int(bandwidth, "bandwidth")
        width = input_dim if bandwidth is None else bandwidth
        self.weight = nn.Parameter(torch.zeros(self.input_dim, width))

    def _ordering_loaded(self) -> None:
        """Whether the ordering is the identity (then no gather is needed): at construction,
        and again when a loaded state dict brings another ordering."""
        natural = torch.arange(self.input_dim, device=self.ordering.device)
        self._natural = bool((self.ordering == natural).all())

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
            value = value[..., self.ordering]
        return value.reshape(-1, self.input_dim), batch_shape

    def _back(self, value: Tensor, batch_shape: torch.Size) -> Tensor:
        if not self._natural:
            value = value[..., self.inverse_ordering]
        return value.reshape(batch_shape + (self.input_dim,))

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rows, batch_shape = self._in_order(x)
        if self.bandwidth is None:  # the rows of y solve y (I - B)^T = x
            y = torch.linalg.solve_triangular(
                self._unit_upper(), rows, upper=True, left=False, unitriangular=True
            )
        else:
            y = self._banded_solve(rows)
        return self._back(y, batch_shape), x.new_zeros(batch_shape)

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        rows, batch_shape = self._in_order(y)
        if self.bandwidth is None:
            x = rows @ self._unit_upper()
        else:  # x_i = y_i - sum over the window of the k values before i
            windows = F.pad(rows, (self.bandwidth, 0)).unfold(-1, self.bandwidth, 1)
            x = rows - (windows[:, : self.input_dim] * self.weight).sum(-1)
        return self._back(x, batch_shape), y.new_zeros(batch_shape)

    def _banded_solve(self, rows: Tensor) -> Tensor:
        """``(I - B)^{-1}`` applied to each row, block by block (see the module docstring)."""
        k, dim = self.bandwidth, self.input_dim
        size = max(k, self.BLOCK)
        blocks = -(-dim // size)
        padding = blocks * size - dim
        weight = F.pad(self.weight, (0, 0, 0, padding)).view(blocks, size, k)
        # band[b, a, c]: the coefficient of column c of [the k values before block b, block b]
        # in row a of block b; row a's window starts at column a
        columns = torch.arange(size, device=rows.device)[:, None] + torch.arange(
            k, device=rows.device
        )
        band = weight.new_zeros(blocks, size, k + size).scatter(
            2, columns.expand(blocks, size, k), weight
        )
        carry, within = band.split([k, size], dim=-1)
        upper = (torch.eye(size, dtype=weight.dtype, device=weight.device) - within).transpose(1, 2)
        x = F.pad(rows, (0, padding)).view(-1, blocks, size)
        before = x.new_zeros(x.shape[0], k)
        solved = []
        for block in range(blocks):  # the rows of y_b solve y_b (I - W_b)^T = x_b + before C_b^T
            rhs = torch.addmm(x[:, block], before, carry[block].t())
            y = torch.linalg.solve_triangular(
                upper[block], rhs, upper=True, left=False, unitriangular=True
            )
            solved.append(y)
            before = y[:, size - k :]
        return torch.cat(solved, dim=-1)[:, :dim]

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bandwidth={self.bandwidth}"


def linear_autoregression(
    input_dim: int, ordering: Ordering = "natural", seed: int = 0, bandwidth: int | None = None
) -> LinearAutoregression:
    """One :class:`LinearAutoregression` layer, the helper beside the class.

    Example::

        >>> import torch, pyro_arflow as af
        >>> layer = af.linear_autoregression(3, ordering="reversed")
        >>> layer.ordering.tolist(), layer.log_abs_det_jacobian(torch.ones(3), layer(torch.ones(3)))
        ([2, 1, 0], tensor(0.))
    """
    return LinearAutoregression(input_dim, ordering, seed, bandwidth=bandwidth)
