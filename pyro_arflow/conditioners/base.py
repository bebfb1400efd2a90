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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_context, check_event

__all__ = ["Conditioner", "Solve", "resolve_order"]

Solve = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``solve(loc, raw_scale, w) -> u``: recovers a position's value from its conditionals."""

Ordering = str | Sequence[int] | Tensor


def resolve_order(input_dim: int, ordering: Ordering = "natural", seed: int = 0) -> Tensor:
    """The permutation ``order`` with ``order[t]`` = the position processed ``t``-th.

    Arguments:
        input_dim: number of positions ``D``.
        ordering: ``"natural"`` (0..D-1), ``"reversed"``, ``"random"`` (seeded), or an explicit
            permutation of ``range(D)``.
        seed: seed of the ``"random"`` ordering.
    """
    if isinstance(ordering, str):
        if ordering == "natural":
            return torch.arange(input_dim)
        if ordering == "reversed":
            return torch.arange(input_dim - 1, -1, -1)
        if ordering == "random":
            generator = torch.Generator().manual_seed(seed)
            return torch.randperm(input_dim, generator=generator)
        raise ValueError(
            f"unknown ordering {ordering!r}; expected 'natural', 'reversed', 'random' "
            "or a permutation of range(input_dim)"
        )
    order = torch.as_tensor(ordering, dtype=torch.long).reshape(-1)
    if not torch.equal(order.sort().values, torch.arange(input_dim)):
        raise ValueError(
            f"an explicit ordering must be a permutation of range({input_dim}), "
            f"got {order.tolist()}"
        )
    return order.clone()


class Conditioner(nn.Module):
    """Base class: an autoregressive network over ``input_dim`` positions in a fixed order.

    Subclasses implement ``_forward`` and ``_recur`` on flattened ``(B, D)`` inputs; this class
    validates shapes, broadcasts the context against the batch and restores batch shapes.

    Attributes:
        input_dim: ``D``.
        context_dim: size of the context vector, or ``None`` for an unconditional network.
        order: buffer, ``order[t]`` = the position processed ``t``-th.
        rank: buffer, the inverse permutation: ``rank[i]`` = when position ``i`` is processed.
    """

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
        if not (isinstance(input_dim, int) and input_dim >= 1):
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        if context_dim is not None and not (isinstance(context_dim, int) and context_dim >= 1):
            raise ValueError(f"context_dim must be None or a positive int, got {context_dim!r}")
        self.input_dim = input_dim
        self.context_dim = context_dim
        order = resolve_order(input_dim, ordering, seed)
        self.register_buffer("order", order)
        self.register_buffer("rank", torch.argsort(order))

    def forward(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """All positions' ``(loc, raw_scale)`` in one pass, each of shape ``u.shape``."""
        u2, context2, batch_shape = self._flatten(u, context, "input")
        loc, raw = self._forward(u2, context2)
        return loc.reshape(batch_shape + (-1,)), raw.reshape(batch_shape + (-1,))

    def recur(
        self, w: Tensor, solve: Solve, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Solve ``u_i = solve(loc_i, raw_i, w_i)`` position by position in the order.

        Returns ``(u, loc, raw_scale)``, where ``(loc, raw_scale) = forward(u, context)``.
        """
        w2, context2, batch_shape = self._flatten(w, context, "input")
        u, loc, raw = self._recur(w2, solve, context2)
        return tuple(t.reshape(batch_shape + (-1,)) for t in (u, loc, raw))  # type: ignore[return-value]

    def _forward(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _recur(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _flatten(
        self, u: Tensor, context: Tensor | None, name: str
    ) -> tuple[Tensor, Tensor | None, torch.Size]:
        check_event(u, self.input_dim, name)
        check_context(context, self.context_dim)
        batch_shape = u.shape[:-1]
        if context is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
            context = context.expand(batch_shape + (-1,)).reshape(-1, self.context_dim)
        u = u.expand(batch_shape + (-1,)).reshape(-1, self.input_dim)
        return u, context, batch_shape

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}"
