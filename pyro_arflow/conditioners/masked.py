r"""The masked conditioner: a MADE network (connectivity in :mod:`.masks`) and its solves.

The sequential solve (``recur``) has two exact methods:

* ``"incremental"`` (default): because hidden degrees are sorted, the units of degree
  :math:`d` in every layer are a contiguous block that becomes final as soon as the inputs of
  degree :math:`\le d` are known. Step :math:`t` computes the degree-:math:`(t-1)` block of
  each layer from the prefix of the layer below, then position :math:`t`'s outputs: every
  unit is computed exactly once, so the whole solve costs about one network pass of
  arithmetic (less: the masked half is skipped), spread over :math:`D` small steps. Under
  autograd each block is appended to its layer's activations; without it, blocks are written
  into activations allocated once (appending copies the prefix, O(D x width x batch) memory
  traffic per layer on top of the arithmetic). The loop is one; only the storage differs.
* ``"passes"``: the textbook fixed point, :math:`D` full network passes (after pass
  :math:`k` the first :math:`k` positions in the ordering are exact). Kept as the reference.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from ..ordering import Ordering
from .base import Conditioner, Solve
from .masks import MaskedLinear, default_output_gain, made_masks, units_through

__all__ = ["MaskedConditioner", "RECUR_METHODS"]

RECUR_METHODS = ("incremental", "passes")


def _build_activation(activation: type[nn.Module] | nn.Module) -> nn.Module:
    """An instance passes through; a class is built, in place when it can be."""
    if isinstance(activation, nn.Module):
        return activation
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ValueError(
            "activation must be an elementwise nn.Module class or instance (e.g. nn.ReLU or "
            f"nn.ELU()), got {activation!r}"
        )
    if "inplace" in inspect.signature(activation).parameters:
        return activation(inplace=True)
    return activation()


class MaskedConditioner(Conditioner):
    """MADE network producing ``(loc, raw_scale)`` for every position in one pass.

    Arguments:
        input_dim: number of positions ``D``.
        hidden_dims: widths of the hidden layers, each at least ``D - 1`` (fewer units cannot
            carry every position's whole prefix, so some dependencies would silently vanish;
            ``[]`` gives a linear autoregression); default ``[3 * input_dim + 1]``, as Pyro's.
        context_dim: size of an optional context vector fed to the first layer.
        ordering: ``"natural"``, ``"reversed"``, ``"random"`` (with ``seed``) or a permutation.
        seed: seed of a random ordering.
        residual: add each hidden layer's input to its output (all widths must be equal).
        skip_connections: let the output layer also read the network's input (and context)
            directly, through the same strictly autoregressive mask: ``loc`` and
            ``raw_scale`` become a linear autoregression plus the hidden layers' correction.
            Default ``False``: what they are for is below, but on the volatility example
            they did not measurably help (README). No effect without hidden layers, whose
            output layer reads the input anyway.
        activation: the nonlinearity, an elementwise ``nn.Module`` class or instance. A class
            that takes ``inplace`` (``nn.ReLU``, ``nn.ELU``, ...) is built with
            ``inplace=True``: it only ever sees pre-activations this network just computed, so
            overwriting them is safe and saves one activation-sized tensor per layer.
        recur_method: ``"incremental"`` (default) or ``"passes"``; see the module docstring.
        output_gain: the multiplier of the output layer's weights; default
            ``min(1, 8 / fan_in)`` (below). ``1.0`` is the plain parametrization.

    The output layer starts at zero, so ``loc = 0`` and ``raw_scale = 0`` until trained, and
    its weights carry the gain ``min(1, 8 / fan_in)``, rounded to a power of two (exact in
    every dtype): the mean-field scaling ``1 / fan_in`` of an output layer (Yang and Hu 2021,
    "Tensor Programs IV", https://arxiv.org/abs/2011.14522), times 8. Adam moves every weight
    by about the learning rate per step whatever its gradient's size, so with gain 1 one step
    moves each output by about ``lr * fan_in * mean|h|``: at lr 1e-2, through the default
    1,510 hidden units of a 503-dimensional guide, loc jumped by 2 in the first step and
    training diverged at step 14. With the gain a step moves an output by about
    ``lr * 8 * mean|h|`` at any width (``mean|h|`` is 0.04 to 0.16 at initialization), about
    the rate of the output biases, which keep gain 1 and learn like plain parameters. The
    price is slower fitting at small learning rates: a MAF fitted by maximum likelihood at
    lr 3e-3 needs about twice the steps of gain 1 (300 rather than 150 to the same loss), and
    ``1 / fan_in`` alone needs four times. At ``64 / fan_in`` the 503-dimensional guide
    diverged again (step 293); at ``32 / fan_in`` it held.

    Why skip connections: a hidden layer of width :math:`H` holds about :math:`H / D` units of
    each degree, so position :math:`i`'s dependence on its nearest predecessor in the order,
    the one that matters most along a latent path, runs through one or two ReLUs. A linear
    term makes every Gaussian autoregression (hence, in an IAF guide, every full-rank
    Gaussian posterior) exactly representable by one layer, and leaves the hidden units the
    non-Gaussian rest (Pyro's ``AutoRegressiveNN`` offers the same as ``skip_connections``).

    Example::

        >>> import torch, pyro_arflow as af
        >>> network = af.MaskedConditioner(5, hidden_dims=[16], ordering="reversed")
        >>> loc, raw_scale = network(torch.randn(3, 5))
        >>> loc.shape, raw_scale.shape
        (torch.Size([3, 5]), torch.Size([3, 5]))
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int | None = None,
        ordering: Ordering = "natural",
        seed: int = 0,
        residual: bool = False,
        skip_connections: bool = False,
        activation: type[nn.Module] | nn.Module = nn.ReLU,
        recur_method: str = "incremental",
        output_gain: float | None = None,
    ) -> None:
        super().__init__(input_dim, context_dim, ordering, seed)
        if recur_method not in RECUR_METHODS:
            raise ValueError(f"recur_method must be one of {RECUR_METHODS}, got {recur_method!r}")
        if hidden_dims is None:
            hidden_dims = [3 * input_dim + 1]
        elif isinstance(hidden_dims, (int, str, Tensor)) or not isinstance(hidden_dims, Sequence):
            raise ValueError(f"hidden_dims must be a list of ints, got {hidden_dims!r}")
        hidden_dims = list(hidden_dims)
        for width in hidden_dims:
            check_positive_int(width, f"every entry of hidden_dims ({hidden_dims})")
        narrow = [width for width in hidden_dims if width < input_dim - 1]
        if narrow:
            raise ValueError(
                f"a MADE hidden layer needs at least input_dim - 1 = {input_dim - 1} units, so "
                f"that every position can depend on all the positions before it (Germain et al. "
                f"2015); got hidden_dims={hidden_dims}"
            )
        if residual and len(set(hidden_dims)) > 1:
            raise ValueError(f"residual connections need equal hidden widths, got {hidden_dims}")
        self.hidden_dims = hidden_dims
        self.residual = residual
        self.skip_connections = bool(skip_connections) and bool(hidden_dims)
        self.recur_method = recur_method
        self.activation = _build_activation(activation)

        context_width = context_dim or 0
        widths = [input_dim + context_width, *hidden_dims]
        self.hidden = nn.ModuleList(
            MaskedLinear(fan_in, width)
            for fan_in, width in zip(widths[:-1], hidden_dims, strict=True)
        )
        output_fan_in = widths[-1] + (widths[0] if self.skip_connections else 0)
        if output_gain is None:
            output_gain = default_output_gain(widths[-1])
        elif isinstance(output_gain, bool) or not isinstance(output_gain, (int, float)):
            raise ValueError(f"output_gain must be a number > 0, got {output_gain!r}")
        elif not (math.isfinite(output_gain) and output_gain > 0):
            raise ValueError(f"output_gain must be a finite number > 0, got {output_gain!r}")
        self.output = MaskedLinear(output_fan_in, 2 * input_dim, gain=float(output_gain))
        nn.init.zeros_(self.output.affine)
        self._units_through = units_through(input_dim, hidden_dims)
        self._set_masks()

    @property
    def _reference(self) -> Tensor:
        return self.output.affine

    def _recur_variant(self) -> tuple:
        return (self.recur_method,)

    def _ordering_loaded(self) -> None:
        self._set_masks()

    def _set_masks(self) -> None:
        hidden, output = made_masks(
            self.inverse_ordering, self.hidden_dims, self.context_dim or 0, self.skip_connections
        )
        for layer, mask in zip(self.hidden, hidden, strict=True):
            layer.set_mask(mask)
        self.output.set_mask(output)

    def _forward(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x = (u,) if context is None else (u, context)  # the input, in pieces (no cat)
        h = x
        for index, layer in enumerate(self.hidden):
            update = self.activation(layer(*h))
            h = (h[0] + update,) if self.residual and index > 0 else (update,)
        if self.skip_connections:
            h = h + x
        loc, raw = self.output(*h).chunk(2, dim=-1)
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

    def _ordered_layers(
        self, context: Tensor | None
    ) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor | None, Tensor]]:
        """The layers rearranged for the incremental solve, inputs in degree order.

        Hidden layers: (masked weight, offset added to the pre-activations), the offset shaped
        (units, 1) or (units, B) with a context folded in. Output: (weight on the last hidden
        layer, weight of the skip connections on the inputs or ``None``, offset), rows
        rearranged to (D, 2, ...): position t's (loc, raw) rows.
        """
        dim = self.input_dim

        def read_input(weight: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
            inputs, context_weight = weight[:, :dim], weight[:, dim:]
            if context is not None:
                offset = torch.addmm(offset, context_weight, context.t())
            return inputs[:, self.ordering], offset

        def per_position(rows: Tensor) -> Tensor:
            return torch.stack([rows[:dim], rows[dim:]], 1)[self.ordering]

        hidden = []
        for index, layer in enumerate([*self.hidden, self.output]):
            weight_t, bias = layer.masked_affine()
            weight, offset = weight_t.t(), bias[:, None]
            if index == 0:
                weight, offset = read_input(weight, offset)
            hidden.append((weight, offset))
        weight, offset = hidden.pop()
        skip = None
        if self.skip_connections:
            weight, skip = weight[:, : self.hidden_dims[-1]], weight[:, self.hidden_dims[-1] :]
            skip, offset = read_input(skip, offset)
            skip = per_position(skip)
        return hidden, (per_position(weight), skip, per_position(offset))

    def _recur_incrementally(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, dim = w.shape
        w_ordered = w.t()[self.ordering]
        hidden, (out_weight, skip, out_offset) = self._ordered_layers(context)
        storage = (
            _AppendedActivations
            if self._tracks_grad(w, context) or torch.jit.is_tracing()
            else _PreallocatedActivations
        )
        known = storage([dim, *self.hidden_dims], w)  # layer 0: the solved values, in order
        through = self._units_through
        params = []
        for t in range(dim):
            if t > 0:  # the units of degree t - 1 are final now: compute each block once
                for layer, (weight, offset) in enumerate(hidden, start=1):
                    start, end = through[layer][t - 1], through[layer][t]
                    if start == end:
                        continue
                    count = through[layer - 1][t]
                    below = known.prefix(layer - 1, count)
                    block = self.activation(
                        torch.addmm(offset[start:end], weight[start:end, :count], below)
                    )
                    if self.residual and layer > 1:
                        block = block + known.rows(layer - 1, start, end)
                    known.append(layer, block)
            count = through[-1][t]
            step = torch.addmm(out_offset[t], out_weight[t, :, :count], known.prefix(-1, count))
            if skip is not None:
                step = torch.addmm(step, skip[t, :, :t], known.prefix(0, t))
            known.append(0, solve(step[0], step[1], w_ordered[t])[None])
            params.append(step)
        u = known.prefix(0, dim)[self.inverse_ordering].t()
        loc, raw = torch.stack(params)[self.inverse_ordering].permute(1, 2, 0)
        return u, loc, raw

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden_dims={self.hidden_dims}, residual={self.residual}, "
            f"skip_connections={self.skip_connections}"
        )


class _AppendedActivations:
    """Each layer's known activations, ``(units, batch)``, grown by ``torch.cat``: every step
    is a new tensor, as autograd needs."""

    def __init__(self, widths: Sequence[int], like: Tensor) -> None:
        self.layers = [like.new_zeros(0, like.shape[0]) for _ in widths]

    def prefix(self, layer: int, count: int) -> Tensor:
        return self.layers[layer][:count]

    def rows(self, layer: int, start: int, end: int) -> Tensor:
        return self.layers[layer][start:end]

    def append(self, layer: int, block: Tensor) -> None:
        self.layers[layer] = torch.cat([self.layers[layer], block])


class _PreallocatedActivations(_AppendedActivations):
    """The same, written into activations allocated once (no autograd): no prefix is copied."""

    def __init__(self, widths: Sequence[int], like: Tensor) -> None:
        self.layers = [like.new_empty(width, like.shape[0]) for width in widths]
        self.filled = [0 for _ in widths]

    def append(self, layer: int, block: Tensor) -> None:
        start = self.filled[layer]
        self.layers[layer][start : start + block.shape[0]].copy_(block)
        self.filled[layer] = start + block.shape[0]
