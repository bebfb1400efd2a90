r"""The convolutional conditioner: a causal dilated convolution over the ordered positions.

The network of a Gaussian IAF in Parallel WaveNet (van den Oord et al. 2018,
https://arxiv.org/abs/1711.10433) and ClariNet (Ping et al. 2019,
https://arxiv.org/abs/1807.07281). Position :math:`t` (in the ordering) reads the
:math:`R` values before it, :math:`u_{t-R}, \dots, u_{t-1}` (zeros before the first), through
``num_layers`` convolutions of width ``kernel_size`` with dilations :math:`1, 2, 4, \dots`, so

.. math::

    R = 1 + (k - 1)(2^{L} - 1),

the receptive field, with :math:`k` the kernel size and :math:`L` the number of layers. Its
parameters do not depend on the number of positions :math:`D`, and ``forward`` is one pass
over the whole sequence.

Every layer is a *valid* convolution of an input padded once, on the left, by :math:`R`
zeros: the value at :math:`t` is then a function of the window :math:`v_{t..t+R-1}` of the
padded input alone, the same function for every :math:`t`. So the sequential solve is exact
and incremental: step :math:`t` runs the network on that one window, the :math:`R` values
before position :math:`t` (solved already), and costs :math:`O(R)` whatever :math:`D`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from ..ordering import Ordering
from .base import Conditioner, Solve

__all__ = ["ConvConditioner"]


class ConvConditioner(Conditioner):
    """Causal dilated convolutions over the positions in order, a 1x1 head to
    ``(loc, raw_scale)``.

    Arguments:
        input_dim: number of positions ``D`` (the parameters do not depend on it).
        channels: width of every hidden layer.
        kernel_size: taps of each convolution (at least 2).
        num_layers: convolutions; layer ``l`` has dilation ``2**l``.
        context_dim: size of an optional context vector, added to every layer's
            pre-activations through a linear map.
        ordering: ``"natural"``, ``"reversed"``, ``"random"`` (with ``seed``) or a permutation.
        seed: seed of a random ordering.

    Layers after the first add their input back (residual connections). The head starts at
    zero, so ``loc = 0`` and ``raw_scale = 0`` until trained.

    Example::

        >>> import torch, pyro_arflow as af
        >>> network = af.ConvConditioner(1000, channels=8, num_layers=3)
        >>> network.receptive_field, sum(p.numel() for p in network.parameters())
        (8, 314)
        >>> loc, raw_scale = network(torch.randn(2, 1000))
        >>> loc.shape
        torch.Size([2, 1000])
    """

    def __init__(
        self,
        input_dim: int,
        channels: int = 32,
        kernel_size: int = 2,
        num_layers: int = 4,
        context_dim: int | None = None,
        ordering: Ordering = "natural",
        seed: int = 0,
    ) -> None:
        super().__init__(input_dim, context_dim, ordering, seed)
        self.channels = check_positive_int(channels, "channels")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2 to read any value, got {kernel_size}")
        self.dilations = [2**layer for layer in range(num_layers)]
        self.receptive_field = 1 + (kernel_size - 1) * sum(self.dilations)
        self.convolutions = nn.ModuleList(
            nn.Conv1d(1 if layer == 0 else channels, channels, kernel_size, dilation=dilation)
            for layer, dilation in enumerate(self.dilations)
        )
        self.context_map = (
            None if context_dim is None else nn.Linear(context_dim, channels * num_layers)
        )
        self.head = nn.Conv1d(channels, 2, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def _reference(self) -> Tensor:
        return self.head.weight

    def _network(self, padded: Tensor, context: Tensor | None) -> Tensor:
        """``(B, L + R - 1)`` padded values -> ``(B, 2, L)`` outputs, valid convolutions."""
        h = padded.unsqueeze(1)
        shifts = (
            None
            if context is None
            else self.context_map(context).unflatten(-1, (self.num_layers, self.channels, 1))
        )
        for layer, convolution in enumerate(self.convolutions):
            pre = convolution(h)
            if shifts is not None:
                pre = pre + shifts[:, layer]
            update = torch.tanh(pre)
            h = update if layer == 0 else h[..., h.shape[-1] - update.shape[-1] :] + update
        return self.head(h)

    def _forward(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        ordered = u[:, self.ordering]
        # position t reads v[t .. t+R-1]: R zeros, then the values before t in order
        padded = F.pad(ordered[:, :-1], (self.receptive_field, 0))
        params = self._network(padded, context)[..., self.inverse_ordering]
        return params[:, 0], params[:, 1]

    def _recur(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch = w.shape[0]
        w_ordered = w[:, self.ordering]
        window = [w.new_zeros(batch)] * self.receptive_field  # the R values before step t
        values, params = [], []
        for t in range(self.input_dim):
            step = self._network(torch.stack(window, dim=-1), context)[..., 0]
            value = solve(step[:, 0], step[:, 1], w_ordered[:, t])
            window = window[1:] + [value]
            values.append(value)
            params.append(step)
        u = torch.stack(values, dim=-1)[:, self.inverse_ordering]
        params_in_position = torch.stack(params, dim=-1)[..., self.inverse_ordering]
        return u, params_in_position[:, 0], params_in_position[:, 1]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, channels={self.channels}, kernel_size={self.kernel_size}, "
            f"num_layers={self.num_layers}, receptive_field={self.receptive_field}"
        )
