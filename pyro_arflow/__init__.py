"""Gaussian autoregressive normalizing flows (IAF, MAF; MADE and LSTM conditioners) for Pyro."""

from .conditioners import LSTMConditioner, MaskedConditioner
from .distributions import GaussianAutoregressive
from .transforms import (
    IAF,
    MAF,
    ConditionalIAF,
    ConditionalMAF,
    conditional_iaf,
    conditional_maf,
    iaf,
    maf,
)

__version__ = "0.1.0"

__all__ = [
    "IAF",
    "MAF",
    "ConditionalIAF",
    "ConditionalMAF",
    "GaussianAutoregressive",
    "LSTMConditioner",
    "MaskedConditioner",
    "conditional_iaf",
    "conditional_maf",
    "iaf",
    "maf",
]
