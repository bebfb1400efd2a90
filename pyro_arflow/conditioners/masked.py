r"""The masked conditioner: MADE (Germain et al. 2015, "MADE: Masked Autoencoder for
Distribution Estimation", https://arxiv.org/abs/1502.03509).

Every unit gets a *degree*. Input :math:`j` has degree :math:`\mathrm{rank}(j)` (its place in
the order), hidden units get degrees in :math:`\{0, \dots, D-2\}`, sorted within each layer,
and a connection from a unit of degree :math:`a` to a hidden unit of degree :math:`b` exists
only when :math:`a \le b`, to an output of position :math:`i` only when
:math:`a < \mathrm{rank}(i)`. So output :math:`i` sees exactly the inputs before it in the
order, and one pass of the network yields all :math:`D` conditionals. A context, when given,
feeds every first-layer unit.

The sequential solve (``recur``) has two exact methods:

* ``"incremental"`` (default): because hidden degrees are sorted, the units of degree
  :math:`d` in every layer are a contiguous block that becomes final as soon as the inputs of
  degree :math:`\le d` are known. Step :math:`t` computes the degree-:math:`(t-1)` block of
  each layer from the prefix of the layer below, then position :math:`t`'s outputs: every
  unit is computed exactly once, so the whole solve costs about one network pass of
  arithmetic (less: the masked half is skipped), spread over :math:`D` small steps.
* ``"passes"``: the textbook fixed point, :math:`D` full network passes (after pass
  :math:`k` the first :math:`k` positions in the order are exact). Kept as the reference.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Conditioner, Ordering, Solve

__all__ = ["MaskedConditioner", "MaskedLinear", "RECUR_METHODS"]

RECUR_METHODS = ("incremental", "passes")


class MaskedLinear(nn.Module):
    r""":math:`x \mapsto x (W \odot M)^\top + b` with a fixed 0/1 ``mask`` :math:`M`.

    :math:`W` and :math:`b` live in one parameter, ``affine`` :math:`= [W^\top; b]` of shape
    ``(in_features + 1, out_features)`` (so :math:`y = [x, 1]\,\text{affine}` unmasked);
    ``weight`` and ``bias`` are views of it. One tensor per layer, not two, because Pyro's
    optimizers (``pyro.optim.Adam`` and friends) keep one optimizer per parameter tensor, and
    each of their steps has a fixed cost (about 0.2 ms on CPU) whatever the tensor's size: for
    a guide of a few layers this halves the optimizer's share of every SVI step. Stored
    transposed so that the bias is a contiguous row. Initialized as ``nn.Linear``: uniform on
    :math:`\pm 1/\sqrt{\text{in\_features}}`.

    Arguments:
        mask: the 0/1 connectivity, shape ``(out_features, in_features)``.
    """

    mask_t: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        out_features, in_features = mask.shape
        self.in_features, self.out_features = in_features, out_features
        # stored like `affine`, transposed, so masking is one contiguous product
        self.register_buffer("mask_t", mask.t().to(torch.get_default_dtype()).contiguous())
        bound = in_features**-0.5
        self.affine = nn.Parameter(
            torch.empty(in_features + 1, out_features).uniform_(-bound, bound)
        )

    @property
    def weight(self) -> Tensor:
        """The unmasked weight :math:`W`, shape ``(out_features, in_features)``, a view."""
        return self.affine[:-1].t()

    @property
    def bias(self) -> Tensor:
        """The bias :math:`b`, a view of ``affine``."""
        return self.affine[-1]

    def masked_affine(self) -> tuple[Tensor, Tensor]:
        r""":math:`((W \odot M)^\top, b)`, shapes ``(in, out)`` and ``(1, out)``.

        One split of ``affine``, so its backward pass is a single copy.
        """
        weight_t, bias = self.affine.split([self.in_features, 1])
        return weight_t * self.mask_t, bias

    def forward(self, x: Tensor) -> Tensor:
        weight_t, bias = self.masked_affine()
        return torch.addmm(bias, x, weight_t)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def hidden_degrees(input_dim: int, width: int) -> Tensor:
    """Sorted degrees of a hidden layer, spread evenly over ``0 .. D-2`` (all 0 when D = 1)."""
    return torch.arange(width) * max(input_dim - 1, 1) // width


def _build_activation(activation: type[nn.Module] | nn.Module) -> nn.Module:
    """An instance passes through; a class is built, in place when it can be."""
    if not isinstance(activation, type):
        return activation
    if "inplace" in inspect.signature(activation).parameters:
        return activation(inplace=True)
    return activation()


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
        activation: the nonlinearity, an elementwise ``nn.Module`` class or instance. A class
            that takes ``inplace`` (``nn.ReLU``, ``nn.ELU``, ...) is built with
            ``inplace=True``: it only ever sees pre-activations this network just computed, so
            overwriting them is safe and saves one activation-sized tensor per layer.
        recur_method: ``"incremental"`` (default) or ``"passes"``; see the module docstring.

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
        recur_method: str = "incremental",
    ) -> None:
        super().__init__(input_dim, context_dim, ordering, seed)
        if recur_method not in RECUR_METHODS:
            raise ValueError(f"recur_method must be one of {RECUR_METHODS}, got {recur_method!r}")
        hidden_dims = [3 * input_dim + 1] if hidden_dims is None else list(hidden_dims)
        if not all(isinstance(h, int) and h >= 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive ints, got {hidden_dims}")
        if residual and len(set(hidden_dims)) > 1:
            raise ValueError(f"residual connections need equal hidden widths, got {hidden_dims}")
        self.hidden_dims = hidden_dims
        self.residual = residual
        self.recur_method = recur_method
        self.activation = _build_activation(activation)

        context_width = context_dim or 0
        in_degrees = self.rank
        layers = []
        # units_through[l][d + 1] = how many units of layer l (0 = the inputs, in order) have
        # degree <= d, for d = -1 .. D-1: the prefix the incremental solve reads.
        self._units_through = [list(range(input_dim + 1))]
        for index, width in enumerate(hidden_dims):
            degrees = hidden_degrees(input_dim, width)
            thresholds = torch.arange(-1, input_dim)
            self._units_through.append(torch.searchsorted(degrees, thresholds, right=True).tolist())
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
        nn.init.zeros_(self.output.affine)

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
        if self.recur_method == "passes":
            return self._recur_by_passes(w, solve, context)
        return self._recur_incrementally(w, solve, context)

    def _recur_by_passes(
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

    def _ordered_layers(self, context: Tensor | None) -> list[tuple[Tensor, Tensor]]:
        """Per layer (hidden ones, then output): masked weight with its inputs in degree order,
        and the offset added to its pre-activations, shaped (units, 1) or (units, B).

        The output layer's rows are rearranged to (D, 2, H): position t's (loc, raw) rows.
        """
        dim = self.input_dim
        layers = [*self.hidden, self.output]
        ordered = []
        for index, layer in enumerate(layers):
            weight_t, bias = layer.masked_affine()
            weight, offset = weight_t.t(), bias.t()
            if index == 0:
                inputs, context_weight = weight[:, :dim], weight[:, dim:]
                weight = inputs[:, self.order]
                if context is not None:
                    offset = torch.addmm(offset, context_weight, context.t())
            if index == len(layers) - 1:
                weight = torch.stack([weight[:dim], weight[dim:]], 1)[self.order]
                offset = torch.stack([offset[:dim], offset[dim:]], 1)[self.order]
            ordered.append((weight, offset))
        return ordered

    def _recur_incrementally(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Activations are kept transposed, (units, batch), so a prefix of units is contiguous.
        batch, dim = w.shape
        w_ordered = w.t()[self.order]
        *hidden, (out_weight, out_offset) = self._ordered_layers(context)
        known = [w.new_zeros(0, batch) for _ in range(len(hidden) + 1)]  # [inputs, hidden...]
        through = self._units_through
        params = []
        for t in range(dim):
            if t > 0:  # the units of degree t - 1 are final now: compute each block once
                for layer, (weight, offset) in enumerate(hidden, start=1):
                    start, end = through[layer][t - 1], through[layer][t]
                    if start == end:
                        continue
                    below = known[layer - 1][: through[layer - 1][t]]
                    block = self.activation(
                        torch.addmm(offset[start:end], weight[start:end, : below.shape[0]], below)
                    )
                    if self.residual and layer > 1:
                        block = block + known[layer - 1][start:end]
                    known[layer] = torch.cat([known[layer], block])
            top = known[-1][: through[-1][t]]
            step = torch.matmul(out_weight[t, :, : top.shape[0]], top) + out_offset[t]
            value = solve(step[0], step[1], w_ordered[t])
            known[0] = torch.cat([known[0], value[None]])
            params.append(step)
        u = known[0][self.rank].t()
        loc, raw = torch.stack(params)[self.rank].permute(1, 2, 0)
        return u, loc, raw

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dims={self.hidden_dims}, residual={self.residual}"
