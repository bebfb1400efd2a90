"""Networks computing a Gaussian autoregressive layer's ``(loc, raw_scale)``: MADE, LSTM and
causal convolutions."""

from __future__ import annotations

from typing import Any

from .._checks import check_keywords
from .base import Conditioner, Solve
from .conv import ConvConditioner
from .lstm import LSTMConditioner
from .masked import MaskedConditioner, MaskedLinear

__all__ = [
    "CONDITIONERS",
    "Conditioner",
    "ConvConditioner",
    "LSTMConditioner",
    "MaskedConditioner",
    "MaskedLinear",
    "Solve",
    "make_conditioner",
]

CONDITIONERS: dict[str, type[Conditioner]] = {
    "masked": MaskedConditioner,
    "lstm": LSTMConditioner,
    "conv": ConvConditioner,
}


def make_conditioner(
    name: str, input_dim: int, context_dim: int | None = None, **kwargs: Any
) -> Conditioner:
    """Build the conditioner called ``name`` (``"masked"``, ``"lstm"`` or ``"conv"``);
    ``ValueError`` for an unknown name or a keyword that conditioner does not take.

    Example::

        >>> from pyro_arflow.conditioners import make_conditioner
        >>> type(make_conditioner("conv", 50, channels=8)).__name__
        'ConvConditioner'
    """
    if not isinstance(name, str) or name not in CONDITIONERS:
        raise ValueError(f"unknown conditioner {name!r}; expected one of {sorted(CONDITIONERS)}")
    check_keywords(CONDITIONERS[name], kwargs, f"the {name} conditioner", skip=1)
    return CONDITIONERS[name](input_dim, context_dim=context_dim, **kwargs)
