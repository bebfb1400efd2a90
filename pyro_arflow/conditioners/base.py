r"""The conditioner contract shared by every network that computes :math:`(\mu_i, \sigma_i)`.

A conditioner reads a vector :math:`u \in \mathbb{R}^D` and returns, for every position
:math:`i`, a location and a raw (unconstrained) scale that depend only on the entries before
:math:`i` in the conditioner's *order* (a permutation of the positions), and optionally on a
context vector. It offers the two directions a Gaussian autoregressive layer needs:

* ``forward(u, context)``: all :math:`D` outputs at once, :math:`u` fully known;
* ``recur(w, solve, context)``: the sequential solve of :math:`u_i = \mathrm{solve}(\mu_i,
  r_i, w_i)` where :math:`(\mu_i, r_i)` depend on :math:`u_{<i}`; each conditioner owns its
  fastest exact way to do it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_context, check_event, check_positive_int
from .._graphs import SolveGraphs

__all__ = ["Conditioner", "Ordering", "Solve", "layer_orders", "resolve_order"]

Solve = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``solve(loc, raw_scale, w) -> u``: recovers a position's value from its conditionals."""

Ordering = str | Sequence[int] | Tensor
ORDER_NAMES = ("natural", "reversed", "random")


def resolve_order(input_dim: int, ordering: Ordering = "natural", seed: int = 0) -> Tensor:
    """The permutation ``order`` with ``order[t]`` = the position processed ``t``-th.

    Arguments:
        input_dim: number of positions ``D``.
        ordering: ``"natural"`` (0..D-1), ``"reversed"``, ``"random"`` (seeded), or an explicit
            permutation of ``range(D)``: a 1-D sequence or tensor of integers.
        seed: seed of the ``"random"`` ordering.
    """
    if isinstance(ordering, str):
        if ordering == "natural":
            return torch.arange(input_dim, device="cpu")
        if ordering == "reversed":
            return torch.arange(input_dim - 1, -1, -1, device="cpu")
        if ordering == "random":
            generator = torch.Generator().manual_seed(seed)
            return torch.randperm(input_dim, generator=generator, device="cpu")
        raise ValueError(
            f"unknown ordering {ordering!r}; expected one of {ORDER_NAMES} "
            "or a permutation of range(input_dim)"
        )
    given = (
        ordering.cpu()
        if isinstance(ordering, Tensor)
        else torch.tensor(list(ordering), device="cpu")
    )
    if given.dim() != 1 or given.dtype in (torch.bool, torch.uint8) or given.is_floating_point():
        raise ValueError(
            f"an explicit ordering must be a 1-D sequence of integers, got {given.dim()}-D "
            f"{given.dtype} {ordering!r}"
        )
    order = given.to(torch.long)
    if not torch.equal(order.sort().values, torch.arange(input_dim, device="cpu")):
        raise ValueError(
            f"an explicit ordering must be a permutation of range({input_dim}), "
            f"got {order.tolist()}"
        )
    return order.clone()


def layer_orders(input_dim: int, num_layers: int, permutation: str, seed: int) -> list[Tensor]:
    """The orders of ``num_layers`` stacked layers: the first natural, then each one either the
    reverse of the one before (``"reversed"``) or a fresh seeded permutation (``"random"``)."""
    if permutation not in ("reversed", "random"):
        raise ValueError(f"permutation must be 'reversed' or 'random', got {permutation!r}")
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.arange(input_dim, device="cpu")]
    for _ in range(num_layers - 1):
        if permutation == "reversed":
            orders.append(orders[-1].flip(0))
        else:
            orders.append(torch.randperm(input_dim, generator=generator, device="cpu"))
    return orders


def _rebuild_after_load(module: Conditioner, incompatible_keys: object) -> None:
    module._order_loaded()  # a module-level function, so that conditioners pickle


class Conditioner(nn.Module):
    """Base class: an autoregressive network over ``input_dim`` positions in a fixed order.

    Subclasses implement ``_forward`` and ``_recur`` on flattened ``(B, D)`` inputs; this class
    validates inputs (shape, dtype, device), broadcasts the context against the batch and
    restores batch shapes (empty batches included). Finiteness is left to the caller, which
    checks what it computes (one check per layer call, on its output).

    Attributes:
        input_dim: ``D``.
        context_dim: size of the context vector, or ``None`` for an unconditional network.
        order: buffer, ``order[t]`` = the position processed ``t``-th; saved in the state dict,
            and everything derived from it is rebuilt when a state dict is loaded.
        rank: the inverse permutation, ``rank[i]`` = when position ``i`` is processed.
        use_cuda_graphs: whether ``recur`` may replay CUDA graphs (default ``True``; they
            never change results, so this is for profiling and debugging).
    """

    use_cuda_graphs: bool = True

    order: Tensor
    rank: Tensor

    def __init__(
        self,
        input_dim: int,
        context_dim: int | None = None,
        ordering: Ordering = "natural",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int(input_dim, "input_dim")
        if context_dim is not None:
            check_positive_int(context_dim, "context_dim")
        self.context_dim = context_dim
        # computed on the CPU, held where the module's tensors are created (the default device)
        order = resolve_order(input_dim, ordering, seed).to(torch.empty(0).device)
        self.register_buffer("order", order)
        self.register_buffer("rank", torch.argsort(self.order), persistent=False)
        self.register_load_state_dict_post_hook(_rebuild_after_load)
        self._solve_graphs = SolveGraphs()

    def _order_loaded(self) -> None:
        """Rebuild what depends on ``order`` after a state dict replaced it."""
        self.rank.copy_(torch.argsort(self.order))

    def forward(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """All positions' ``(loc, raw_scale)`` in one pass, each of shape ``u.shape``."""
        u2, context2, batch_shape = self._flatten(u, context)
        loc, raw = self._forward(u2, context2)
        return self._unflatten(loc, batch_shape), self._unflatten(raw, batch_shape)

    def recur(
        self, w: Tensor, solve: Solve, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Solve ``u_i = solve(loc_i, raw_i, w_i)`` position by position in the order.

        Returns ``(u, loc, raw_scale)``, where ``(loc, raw_scale) = forward(u, context)``.
        On CUDA, outside autograd, a repeated solve is replayed as a CUDA graph (see
        :mod:`pyro_arflow._graphs`); ``solve`` is then part of the graph's key, so pass the
        same (hashable) object each time to benefit.
        """
        w2, context2, batch_shape = self._flatten(w, context)
        graphable = self.use_cuda_graphs and not self._tracks_grad(w2, context2)
        if graphable and self._solve_graphs.applicable(w2):
            key = (solve, self._recur_variant())
            u, loc, raw = self._solve_graphs.run(
                self, key, lambda w, c: self._recur(w, solve, c), w2, context2
            )
        else:
            u, loc, raw = self._recur(w2, solve, context2)
        return (
            self._unflatten(u, batch_shape),
            self._unflatten(loc, batch_shape),
            self._unflatten(raw, batch_shape),
        )

    @property
    def _reference(self) -> Tensor:
        """A parameter whose dtype and device the inputs must share (subclasses name one
        directly: walking ``parameters()`` on every call costs more than the check)."""
        return next(self.parameters())

    def _recur_variant(self) -> tuple:
        """What else decides the arithmetic of ``_recur`` (a graph recorded for one variant
        must never be replayed for another); subclasses with such settings name them."""
        return ()

    def _tracks_grad(self, *inputs: Tensor | None) -> bool:
        """Whether autograd records a call on ``inputs``: some input or parameter needs a
        gradient while gradients are on."""
        if not torch.is_grad_enabled():
            return False
        tensors = itertools.chain(self.parameters(), (t for t in inputs if t is not None))
        return any(t.requires_grad for t in tensors)

    def _forward(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _recur(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _flatten(
        self, u: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor | None, torch.Size]:
        like = self._reference
        check_event(u, self.input_dim, "input", like, finite=False)
        check_context(context, self.context_dim, like, finite=False)
        batch_shape = u.shape[:-1]
        if context is not None:
            try:
                batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"the context's batch shape {tuple(context.shape[:-1])} does not broadcast "
                    f"with the input's {tuple(u.shape[:-1])}"
                ) from None
            context = context.expand(batch_shape + (-1,)).reshape(-1, self.context_dim)
        u = u.expand(batch_shape + (-1,)).reshape(-1, self.input_dim)
        return u, context, batch_shape

    def _unflatten(self, value: Tensor, batch_shape: torch.Size) -> Tensor:
        return value.reshape(batch_shape + (self.input_dim,))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}"
