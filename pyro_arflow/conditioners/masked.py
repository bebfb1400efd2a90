r"""The masked conditioner: MADE (Germain et al. 2015, "MADE: Masked Autoencoder for
Distribution Estimation", https://arxiv.org/abs/1502.03509).

Every unit gets a *degree*. Input :math:`j` has degree :math:`\mathrm{rank}(j)` (its place in
the order), hidden units get degrees in :math:`\{0, \dots, D-2\}`, sorted within each layer,
and a connection from a unit of degree :math:`a` to a hidden unit of degree :math:`b` exists
only when :math:`a \le b`, to an output of position :math:`i` only when
:math:`a < \mathrm{rank}(i)`. Every hidden layer has at least :math:`D - 1` units, so every
degree occurs in it and output :math:`i` sees exactly the inputs before it in the order: one
pass of the network yields all :math:`D` conditionals, none of their dependencies lost. A
context, when given, feeds every first-layer unit.

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
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from .base import Conditioner, Ordering, Solve

__all__ = ["MaskedConditioner", "MaskedLinear", "RECUR_METHODS"]

RECUR_METHODS = ("incremental", "passes")


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
    a power of two, which every floating dtype holds exactly (see :class:`MaskedConditioner`)."""
    return 2.0 ** -max(0, round(math.log2(fan_in / 8)))


def hidden_degrees(input_dim: int, width: int) -> Tensor:
    """Sorted degrees of a hidden layer, spread evenly over ``0 .. D-2`` (all 0 when D = 1).

    With ``width >= D - 1`` every degree occurs, which is what keeps every dependency.
    """
    return torch.arange(width, device="cpu") * max(input_dim - 1, 1) // width


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
        # units_through[l][d + 1] = how many units of layer l (0 = the inputs, in order) have
        # degree <= d, for d = -1 .. D-1: the prefix the incremental solve reads.
        thresholds = torch.arange(-1, input_dim, device="cpu")
        self._units_through = [list(range(input_dim + 1))] + [
            torch.searchsorted(hidden_degrees(input_dim, width), thresholds, right=True).tolist()
            for width in hidden_dims
        ]
        self._set_masks()

    @property
    def _reference(self) -> Tensor:
        return self.output.affine

    def _recur_variant(self) -> tuple:
        return (self.recur_method,)

    def _order_loaded(self) -> None:
        super()._order_loaded()
        self._set_masks()

    def _set_masks(self) -> None:
        """Connectivity from the degrees: input j has degree rank(j), hidden units their
        sorted degrees; a hidden unit sees degrees <= its own, output i degrees < rank(i)."""
        rank = self.rank.cpu()
        context_width = self.context_dim or 0
        in_degrees = rank
        for index, layer in enumerate(self.hidden):
            degrees = hidden_degrees(self.input_dim, layer.out_features)
            mask = (in_degrees[None, :] <= degrees[:, None]).float()
            if index == 0:
                context_mask = torch.ones(len(degrees), context_width, device="cpu")
                mask = torch.cat([mask, context_mask], dim=1)
            layer.set_mask(mask)
            in_degrees = degrees

        def strictly_before(degrees: Tensor) -> Tensor:  # (loc rows, raw rows) x units
            return (degrees[None, :] < rank[:, None]).float().repeat(2, 1)

        blocks = [strictly_before(in_degrees)]
        if self.skip_connections:
            blocks.append(strictly_before(rank))
        if self.skip_connections or not self.hidden_dims:
            blocks.append(torch.ones(2 * self.input_dim, context_width, device="cpu"))
        self.output.set_mask(torch.cat(blocks, dim=1))

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
        if self._tracks_grad(w, context) or torch.jit.is_tracing():
            return self._recur_incrementally(w, solve, context)
        return self._recur_incrementally_in_place(w, solve, context)

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
            return inputs[:, self.order], offset

        def per_position(rows: Tensor) -> Tensor:
            return torch.stack([rows[:dim], rows[dim:]], 1)[self.order]

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
        # Activations are kept transposed, (units, batch), so a prefix of units is contiguous.
        batch, dim = w.shape
        w_ordered = w.t()[self.order]
        hidden, (out_weight, skip, out_offset) = self._ordered_layers(context)
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
            if skip is not None:
                step = step + torch.matmul(skip[t, :, :t], known[0])
            value = solve(step[0], step[1], w_ordered[t])
            known[0] = torch.cat([known[0], value[None]])
            params.append(step)
        u = known[0][self.rank].t()
        loc, raw = torch.stack(params)[self.rank].permute(1, 2, 0)
        return u, loc, raw

    def _recur_incrementally_in_place(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The incremental solve without autograd: every block is written into preallocated
        activations, where the autograd version appends it (``cat`` copies the prefix, so
        that version moves O(D x width x batch) memory per layer on top of the arithmetic)."""
        batch, dim = w.shape
        w_ordered = w.t()[self.order]
        hidden, (out_weight, skip, out_offset) = self._ordered_layers(context)
        known = [w.new_empty(dim, batch)] + [w.new_empty(h, batch) for h in self.hidden_dims]
        params = w.new_empty(dim, 2, batch)
        through = self._units_through
        for t in range(dim):
            if t > 0:  # the units of degree t - 1 are final now: compute each block once
                for layer, (weight, offset) in enumerate(hidden, start=1):
                    start, end = through[layer][t - 1], through[layer][t]
                    if start == end:
                        continue
                    count = through[layer - 1][t]
                    block = known[layer][start:end]
                    torch.addmm(
                        offset[start:end],
                        weight[start:end, :count],
                        known[layer - 1][:count],
                        out=block,
                    )
                    activated = self.activation(block)
                    if self.residual and layer > 1:
                        torch.add(activated, known[layer - 1][start:end], out=block)
                    elif activated is not block:
                        block.copy_(activated)
            count = through[-1][t]
            torch.addmm(out_offset[t], out_weight[t, :, :count], known[-1][:count], out=params[t])
            if skip is not None:
                params[t].addmm_(skip[t, :, :t], known[0][:t])
            known[0][t] = solve(params[t, 0], params[t, 1], w_ordered[t])
        u = known[0][self.rank].t()
        loc, raw = params[self.rank].permute(1, 2, 0)
        return u, loc, raw

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden_dims={self.hidden_dims}, residual={self.residual}, "
            f"skip_connections={self.skip_connections}"
        )
