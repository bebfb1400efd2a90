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
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._checks import check_context, check_event, check_positive_int
from .._graphs import SolveGraphs
from ..ordering import Ordering, register_ordering, resolve_ordering

__all__ = ["Conditioner", "Solve"]

Solve = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``solve(loc, raw_scale, w) -> u``: recovers a position's value from its conditionals."""


class Conditioner(nn.Module):
    """Base class: an autoregressive network over ``input_dim`` positions in a fixed order.

    Subclasses implement ``_forward`` and ``_recur`` on flattened ``(B, D)`` inputs; this class
    validates inputs (shape, dtype, device), broadcasts the context against the batch and
    restores batch shapes (empty batches included). Finiteness is left to the caller, which
    checks what it computes (one check per layer call, on its output).

    Attributes:
        input_dim: ``D``.
        context_dim: size of the context vector, or ``None`` for an unconditional network.
        ordering: buffer, ``ordering[t]`` = the position visited ``t``-th; saved in the state
            dict, and everything derived from it is rebuilt when a state dict is loaded.
        inverse_ordering: ``inverse_ordering[i]`` = when position ``i`` is visited
            (see :mod:`pyro_arflow.ordering`).
        use_cuda_graphs: whether ``recur`` may replay CUDA graphs (default ``True``; they
            never change results, so this is for profiling and debugging).
    """

    use_cuda_graphs: bool = True

    ordering: Tensor
    inverse_ordering: Tensor

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
        register_ordering(self, resolve_ordering(input_dim, ordering, seed))
        self._solve_graphs = SolveGraphs()

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
