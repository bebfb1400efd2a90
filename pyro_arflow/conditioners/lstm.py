r"""The LSTM conditioner: :math:`h_t = \mathrm{LSTM}(h_{t-1}, u_{t-1})`,
:math:`(\mu_t, r_t) = \mathrm{head}(h_t)`, positions taken in the conditioner's order.

Position 0 reads a learned start value from a learned initial state, so its conditional is
well defined (an empty prefix). ``forward`` runs the LSTM over the shifted sequence
:math:`(s, u_0, \dots, u_{D-2})`, in one call when its gate buffers (steps x batch x 4 x
hidden) fit in ``FORWARD_GATE_BUDGET`` entries, otherwise in windows of steps that do, the
state carried from one window to the next: the same result, without a buffer growing with
:math:`D` times the batch (at :math:`D = 4096`, batch 256, hidden 64, one call would allocate
1 GiB of them; windows of 64 steps there are also faster on CPU). ``recur`` steps the same
weights once per position with the state carried (one fused ``lstm_cell`` call per layer and
step), feeding each solved value back in. Both cost :math:`O(D)` LSTM steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from .base import Conditioner, Ordering, Solve

__all__ = ["FORWARD_GATE_BUDGET", "LSTMConditioner"]

FORWARD_GATE_BUDGET = 2**22
"""Most LSTM gate entries one ``forward`` call may hold (16 MiB in float32)."""


@contextmanager
def _full_precision_cudnn(like: Tensor) -> Iterator[None]:
    """cuDNN's LSTM in full float32 on CUDA. By default it may use TF32 tensor cores (10-bit
    mantissas), while ``recur`` steps ``torch.lstm_cell``, whose matrix products do not: a
    layer's two directions then disagree by about 5e-5, and its inverse is no longer exact."""
    if not like.is_cuda or not torch.backends.cudnn.allow_tf32:
        yield
        return
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = True


class LSTMConditioner(Conditioner):
    """An LSTM over the positions in order, with a linear head to ``(loc, raw_scale)``.

    Arguments:
        input_dim: number of positions ``D``.
        hidden_size: LSTM state size.
        num_layers: stacked LSTM layers.
        context_dim: size of an optional context vector, fed to every step.
        ordering: ``"natural"``, ``"reversed"``, ``"random"`` (with ``seed``) or a permutation.
        seed: seed of a random ordering.

    The head and a per-position bias start at zero, so ``loc = 0`` and ``raw_scale = 0``
    until trained.

    Example::

        >>> import torch, pyro_arflow as af
        >>> network = af.LSTMConditioner(100, hidden_size=8, context_dim=2)
        >>> loc, raw_scale = network(torch.randn(4, 100), torch.randn(4, 2))
        >>> loc.shape
        torch.Size([4, 100])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_size: int = 32,
        num_layers: int = 1,
        context_dim: int | None = None,
        ordering: Ordering = "natural",
        seed: int = 0,
    ) -> None:
        super().__init__(input_dim, context_dim, ordering, seed)
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        self.lstm = nn.LSTM(1 + (context_dim or 0), hidden_size, num_layers)
        self.start_value = nn.Parameter(torch.zeros(()))
        self.start_hidden = nn.Parameter(torch.zeros(num_layers, 1, hidden_size))
        self.start_cell = nn.Parameter(torch.zeros(num_layers, 1, hidden_size))
        self.head = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.position_bias = nn.Parameter(torch.zeros(input_dim, 1, 2))

    @property
    def _reference(self) -> Tensor:
        return self.head.weight

    def _start_state(self, batch: int) -> tuple[Tensor, Tensor]:
        shape = (self.num_layers, batch, self.hidden_size)
        return (
            self.start_hidden.expand(shape).contiguous(),
            self.start_cell.expand(shape).contiguous(),
        )

    def _steps_input(self, values: Tensor, context: Tensor | None) -> Tensor:
        """(T, B) values -> (T, B, 1 + C) LSTM input, the context repeated at every step."""
        x = values.unsqueeze(-1)
        if context is None:
            return x
        return torch.cat([x, context.expand(values.shape[0], -1, -1)], dim=-1)

    def _unorder(self, ordered: Tensor) -> tuple[Tensor, Tensor]:
        """(D, B, 2) head outputs in order -> (loc, raw) of shape (B, D) in position index."""
        params = ordered.permute(1, 2, 0)[..., self.inverse_ordering]
        return params[:, 0], params[:, 1]

    def _forward(self, u: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        batch = u.shape[0]
        ordered = u.t()[self.ordering]
        start = self.start_value.expand(1, batch)
        shifted = torch.cat([start, ordered[:-1]], dim=0)
        state = self._start_state(batch)
        params = []
        steps_per_call = max(1, FORWARD_GATE_BUDGET // (max(batch, 1) * 4 * self.hidden_size))
        with _full_precision_cudnn(u):
            for window in self._steps_input(shifted, context).split(steps_per_call):
                hidden, state = self.lstm(window, state)
                params.append(self.head(hidden))
        return self._unorder(torch.cat(params) + self.position_bias)

    def _recur(
        self, w: Tensor, solve: Solve, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        # One fused cell call per layer and step, on the same weights nn.LSTM uses in forward.
        batch = w.shape[0]
        w_ordered = w.t()[self.ordering]
        hidden, cell = self._start_state(batch)
        states = list(zip(hidden.unbind(0), cell.unbind(0), strict=True))
        weights = [
            [
                getattr(self.lstm, f"{kind}_l{k}")
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            for k in range(self.num_layers)
        ]
        head_weight = self.head.weight.t()
        # (D, 2): one add, not one a step; 1-D rows, so addmm adds them in its epilogue
        biases = (self.head.bias + self.position_bias).reshape(self.input_dim, 2)
        value = self.start_value.expand(batch, 1)
        values, params = [], []
        for t in range(self.input_dim):
            x = value if context is None else torch.cat([value, context], dim=-1)
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
                states[layer] = torch.lstm_cell(x, states[layer], w_ih, w_hh, b_ih, b_hh)
                x = states[layer][0]
            step_params = torch.addmm(biases[t], x, head_weight)
            value = solve(step_params[:, :1], step_params[:, 1:], w_ordered[t, :, None])
            values.append(value)
            params.append(step_params)
        u = torch.cat(values, dim=1)[:, self.inverse_ordering]
        loc, raw = self._unorder(torch.stack(params, dim=0))
        return u, loc, raw

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden_size={self.hidden_size}, num_layers={self.num_layers}"
        )
