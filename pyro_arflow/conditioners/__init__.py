"""Networks computing a Gaussian autoregressive layer's ``(loc, raw_scale)``: MADE and LSTM."""

from __future__ import annotations

from typing import Any

from .._checks import check_keywords
from .base import Conditioner, Ordering, Solve, layer_orders, resolve_order
from .lstm import LSTMConditioner
from .masked import MaskedConditioner, MaskedLinear

__all__ = [
    "CONDITIONERS",
    "Conditioner",
    "LSTMConditioner",
    "MaskedConditioner",
    "MaskedLinear",
    "Ordering",
    "Solve",
    "layer_orders",
    "make_conditioner",
    "resolve_order",
]

CONDITIONERS: dict[str, type[Conditioner]] = {
    "masked": MaskedConditioner,
    "lstm": LSTMConditioner,
}


def make_conditioner(
    name: str, input_dim: int, context_dim: int | None = None, **kwargs: Any
) -> Conditioner:
    """Build the conditioner called ``name`` (``"masked"`` or ``"lstm"``); ``ValueError`` for an
    unknown name or a keyword that conditioner does not take."""
    if not isinstance(name, str) or name not in CONDITIONERS:
        raise ValueError(f"unknown conditioner {name!r}; expected one of {sorted(CONDITIONERS)}")
    check_keywords(CONDITIONERS[name], kwargs, f"the {name} conditioner", skip=1)
    return CONDITIONERS[name](input_dim, context_dim=context_dim, **kwargs)
