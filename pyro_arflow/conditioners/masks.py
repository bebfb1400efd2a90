r"""MADE's connectivity (Germain et al. 2015, "MADE: Masked Autoencoder for Distribution
Estimation", https://arxiv.org/abs/1502.03509): degrees, masks, and the masked linear map.

Every unit gets a *degree*. Input :math:`j` has degree :math:`o^{-1}(j)` (when it is visited
in the ordering :math:`o`), hidden units get degrees in :math:`\{0, \dots, D-2\}`, sorted
within each layer, and a connection from a unit of degree :math:`a` to a hidden unit of degree
:math:`b` exists only when :math:`a \le b`, to an output of position :math:`i` only when
:math:`a < o^{-1}(i)`. Every hidden layer has at least :math:`D - 1` units, so every degree
occurs in it and output :math:`i` sees exactly the inputs before it in the ordering: one pass
of the network yields all :math:`D` conditionals, none of their dependencies lost. A context,
when given, feeds every first-layer unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MaskedLinear",
    "default_output_gain",
    "hidden_degrees",
    "made_masks",
    "units_through",
]


class MaskedLinear(nn.Module):
    r""":math:`x \mapsto x (W \odot M)^\top + b` with a fixed connectivity :math:`M`.

    :math:`W` and :math:`b` live in one parameter, ``affine`` :math:`= [W^\top; b]` of shape
    ``(in_features + 1, out_features)`` (so :math:`y = [x, 1]\,\text{affine}` unmasked);
    ``weight`` and ``bias`` are views of it. One tensor per layer, not two, because Pyro's
    optimizers (``pyro.optim.Adam`` and friends) keep one optimizer per parameter tensor, and
    each of their steps has a fixed cost (about 0.2 ms on CPU) whatever the tensor's size: for
    a guide of a few layers this halves the optimizer's share of every SVI step. Stored
    transposed so that the bias is a contiguous row. Initialized as ``nn.Linear``: uniform on
    :math:`\pm 1/\sqrt{\text{in\_features}}`.

    :math:`M` holds 0 where a connection is cut and ``gain`` where it exists; it is derived
    from the network's structure (:meth:`set_mask`), so it is a buffer kept out of the state
    dict: checkpoints hold parameters only.

    Arguments:
        in_features, out_features: the sizes of the map.
        gain: the multiplier of every kept weight (the bias has none).

    Example::

        >>> import torch
        >>> from pyro_arflow.conditioners.masks import MaskedLinear
        >>> layer = MaskedLinear(2, 2)
        >>> layer.set_mask(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))  # output 0 reads input 0
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(layer(x)[:, 0], x[:, 0] * layer.weight[0, 0] + layer.bias[0])
        True
    """

    mask_t: Tensor

    def __init__(self, in_features: int, out_features: int, gain: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.gain = in_features, out_features, gain
        bound = in_features**-0.5
        self.affine = nn.Parameter(
            torch.empty(in_features + 1, out_features).uniform_(-bound, bound)
        )
        self.register_buffer(
            "mask_t", torch.full((in_features, out_features), gain), persistent=False
        )
        self._masked_weight: tuple[tuple[int, ...], Tensor, Tensor] | None = None

    def set_mask(self, mask: Tensor) -> None:
        """Set the 0/1 connectivity, shape ``(out_features, in_features)``."""
        self.mask_t.copy_(mask.t() * self.gain)

    @property
    def weight(self) -> Tensor:
        """The unmasked weight :math:`W`, shape ``(out_features, in_features)``, a view."""
        return self.affine[:-1].t()

    @property
    def bias(self) -> Tensor:
        """The bias :math:`b`, a view of ``affine``."""
        return self.affine[-1]

    def masked_affine(self) -> tuple[Tensor, Tensor]:
        r""":math:`((W \odot M)^\top, b)`, shapes ``(in, out)`` and ``(out,)``.

        One split of ``affine``, so its backward pass is a single copy; the bias is 1-D, which
        lets ``addmm`` on CUDA add it in the matrix product's epilogue rather than first
        copying it into every row of the output. Without autograd the
        masked weight is kept until ``affine`` or the mask changes (their version counters
        and addresses tell), so inference and sampling skip the product; inside a CUDA-graph
        capture or a JIT trace it is always recomputed, so that replays see updated weights.
        """
        affine, mask = self.affine, self.mask_t
        if (
            (torch.is_grad_enabled() and affine.requires_grad)
            or torch.jit.is_tracing()
            or (affine.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            weight_t, bias = affine.split([self.in_features, 1])
            return weight_t * mask, bias.view(-1)
        key = (affine._version, affine.data_ptr(), mask._version, mask.data_ptr())
        cached = self._masked_weight
        if cached is None or cached[0] != key:
            weight_t, bias = affine.split([self.in_features, 1])
            cached = self._masked_weight = (key, weight_t * mask, bias.view(-1))
        return cached[1], cached[2]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: object.__getstate__ gives __dict__ itself
        state["_masked_weight"] = None
        return state

    def forward(self, *pieces: Tensor) -> Tensor:
        """The map of the input ``x``, given whole or as ``pieces`` whose features, side by
        side, make ``x`` (each piece meets its own rows of the weight: no copy into one
        tensor, as ``torch.cat`` would make)."""
        weight_t, bias = self.masked_affine()
        if len(pieces) == 1:
            return torch.addmm(bias, pieces[0], weight_t)
        blocks = weight_t.split([piece.shape[-1] for piece in pieces])
        y = torch.addmm(bias, pieces[0], blocks[0])
        for piece, block in zip(pieces[1:], blocks[1:], strict=True):
            y.addmm_(piece, block)  # in place is safe: addmm's backward never reads its output
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gain={self.gain}"


def default_output_gain(fan_in: int) -> float:
    """The gain of an output layer reading ``fan_in`` units: ``min(1, 8 / fan_in)`` rounded to
    a power of two, which every floating dtype holds exactly (see
    :class:`~pyro_arflow.MaskedConditioner`).

    Example::

        >>> from pyro_arflow.conditioners.masks import default_output_gain
        >>> default_output_gain(8), default_output_gain(64), default_output_gain(1510)
        (1.0, 0.125, 0.00390625)
    """
    return 2.0 ** -max(0, round(math.log2(fan_in / 8)))


def hidden_degrees(input_dim: int, width: int) -> Tensor:
    """Sorted degrees of a hidden layer, spread evenly over ``0 .. D-2`` (all 0 when D = 1).

    With ``width >= D - 1`` every degree occurs, which is what keeps every dependency.

    Example::

        >>> from pyro_arflow.conditioners.masks import hidden_degrees
        >>> hidden_degrees(4, 6).tolist()
        [0, 0, 1, 1, 2, 2]
    """
    return torch.arange(width, device="cpu") * max(input_dim - 1, 1) // width


def units_through(input_dim: int, hidden_dims: Sequence[int]) -> list[list[int]]:
    """``result[l][d + 1]`` = how many units of layer ``l`` (0 = the inputs, in the ordering)
    have degree ``<= d``, for ``d = -1 .. D-1``: the prefix of each layer that is final once
    the first ``d + 1`` positions are known (sorted degrees make it a prefix).

    Example::

        >>> from pyro_arflow.conditioners.masks import units_through
        >>> units_through(3, [4])
        [[0, 1, 2, 3], [0, 2, 4, 4]]
    """
    thresholds = torch.arange(-1, input_dim, device="cpu")
    return [list(range(input_dim + 1))] + [
        torch.searchsorted(hidden_degrees(input_dim, width), thresholds, right=True).tolist()
        for width in hidden_dims
    ]


def made_masks(
    inverse_ordering: Tensor,
    hidden_dims: Sequence[int],
    context_dim: int,
    skip_connections: bool,
) -> tuple[list[Tensor], Tensor]:
    """The 0/1 connectivity of every layer, each shaped ``(out_features, in_features)``.

    Arguments:
        inverse_ordering: when each position is visited: the inputs' degrees.
        hidden_dims: the hidden layers' widths (hidden units get :func:`hidden_degrees`).
        context_dim: the context's width (0 for none); it feeds every first-layer unit, and
            the output layer directly when that reads the input.
        skip_connections: whether the output layer also reads the input (and context).

    Returns ``(hidden masks, output mask)``; the output's rows are all the ``loc`` rows, then
    all the ``raw_scale`` rows, and its columns are the last hidden layer's units, then the
    input and context if the output reads them (always when there are no hidden layers).

    Example::

        >>> import torch
        >>> from pyro_arflow.conditioners.masks import made_masks
        >>> hidden, output = made_masks(torch.tensor([0, 1, 2]), [2], 0, False)
        >>> hidden[0].tolist(), output[:3].tolist()  # loc rows: position i sees degrees < i
        ([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    """
    degrees_in = inverse_ordering.cpu()
    input_dim = len(degrees_in)
    hidden = []
    in_degrees = degrees_in
    for index, width in enumerate(hidden_dims):
        degrees = hidden_degrees(input_dim, width)
        mask = (in_degrees[None, :] <= degrees[:, None]).float()
        if index == 0:
            mask = torch.cat([mask, torch.ones(width, context_dim, device="cpu")], dim=1)
        hidden.append(mask)
        in_degrees = degrees

    def strictly_before(degrees: Tensor) -> Tensor:  # (loc rows, raw rows) x units
        return (degrees[None, :] < degrees_in[:, None]).float().repeat(2, 1)

    blocks = [strictly_before(in_degrees)]
    if skip_connections:
        blocks.append(strictly_before(degrees_in))
    if skip_connections or not hidden_dims:
        blocks.append(torch.ones(2 * input_dim, context_dim, device="cpu"))
    return hidden, torch.cat(blocks, dim=1)
