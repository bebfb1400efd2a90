r"""The masked conditioner: MADE (Germain et al. 2015, "MADE: Masked Autoencoder for
Distribution Estimation", https://arxiv.org/abs/1502.03509).

Every unit gets a *degree*. Input :math:`j` has degree :math:`\mathrm{rank}(j)` (its place in
the order), hidden units get degrees in :math:`\{0, \dots, D-2\}`, sorted within each layer,
and a connection from a unit of degree :math:`a` to a hidden unit of degree :math:`b` exists
only when :math:`a \le b`, to an output of position :math:`i` only when
:math:`a < \mathrm{rank}(i)`. So output :math:`i` sees exactly the inputs before it in the
order, and one pass of the network yields all :math:`D` conditionals. A context, when given,
feeds every first-layer unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Conditioner, Ordering, Solve

__all__ = ["MaskedConditioner", "MaskedLinear"]


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` of the same shape."""

    mask: Tensor

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def hidden_degrees(input_dim: int, width: int) -> Tensor:
    """Sorted degrees of a hidden layer, spread evenly over ``0 .. D-2`` (all 0 when D = 1)."""
    return torch.arange(width) * max(input_dim - 1, 1) // width


class MaskedConditioner(Conditioner):
    """MADE network producing ``(loc, raw_scale)`` for every position in one pass.

    Arguments:
        input_dim: number of positions ``D``.
        hidden_dims: widths of the hidden layers (``[]`` gives a linear autoregression);
            default ``[3 * input_dim + 1]``, as Pyro's.
        context_dim: size of an optional context vector fed to the first layer.
        ordering: ``"natural"``, ``"reversed"``, ``"random"`` (with ``seed``) or a permutation.
        seed: seed of a random ordering.
        residual: add each hidden layer's input to its output (all widths must be equal).
        activation: the nonlinearity, an ``nn.Module`` class or instance.

    The output layer starts at zero, so ``loc = 0`` and ``raw_scale = 0`` until trained.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int | None = None,
        ordering: Ordering = "natural",
        seed: int = 0,
        residual: bool = False,
        activation: type[nn.Module] | nn.Module = nn.ReLU,
    ) -> None:
        super().__init__(input_dim, context_dim, ordering, seed)
        hidden_dims = [3 * input_dim + 1] if hidden_dims is None else list(hidden_dims)
        if not all(isinstance(h, int) and h >= 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive ints, got {hidden_dims}")
        if residual and len(set(hidden_dims)) > 1:
            raise ValueError(f"residual connections need equal hidden widths, got {hidden_dims}")
        self.hidden_dims = hidden_dims
        self.residual = residual
        self.activation = activation() if isinstance(activation, type) else activation

        context_width = context_dim or 0
        in_degrees = self.rank
        layers = []
        for index, width in enumerate(hidden_dims):
            degrees = hidden_degrees(input_dim, width)
            mask = (in_degrees[None, :] <= degrees[:, None]).float()
            if index == 0:
                mask = torch.cat([mask, torch.ones(width, context_width)], dim=1)
            layers.append(MaskedLinear(mask))
            in_degrees = degrees
        output_mask = (in_degrees[None, :] < self.rank[:, None]).float().repeat(2, 1)
        if not hidden_dims:
            output_mask = torch.cat([output_mask, torch.ones(2 * input_dim, context_width)], 1)
        self.hidden = nn.ModuleList(layers)
        self.output = MaskedLinear(output_mask)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def _forward(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        h = u if context is None else torch.cat([u, context], dim=-1)
        for index, layer in enumerate(self.hidden):
            update = self.activation(layer(h))
            h = h + update if self.residual and index > 0 else update
        loc, raw = self.output(h).chunk(2, dim=-1)
        return loc, raw

    def _recur(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        # After pass k the first k positions in the order are exact, so D passes solve it.
        # The network of the last pass reads the solution up to its final position, which
        # no output depends on, so its (loc, raw) are those of the solution.
        u = w
        for _ in range(self.input_dim):
            loc, raw = self._forward(u, context)
            u = solve(loc, raw, w)
        return u, loc, raw

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dims={self.hidden_dims}, residual={self.residual}"
