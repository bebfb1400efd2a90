"""Gaussian autoregressive normalizing flows (IAF, MAF; MADE and LSTM conditioners) for Pyro."""

from ._checks import flush_finite_checks
from .conditioners import LSTMConditioner, MaskedConditioner
from .diagnostics import ImportanceDraws, importance_resample, psis_khat, to_inference_data
from .distributed import init_parameters
from .distributions import GaussianAutoregressive
from .fitting import FitResult, fit
from .guides import AutoARFlow
from .linear import LinearAutoregression, linear_autoregression
from .paths import GaussianPath
from .priors import FlowPrior
from .registry import available_flows, build_flow, get_flow, register_flow
from .transforms import (
    IAF,
    MAF,
    ConditionalIAF,
    ConditionalMAF,
    Permutation,
    conditional_iaf,
    conditional_maf,
    iaf,
    maf,
)

__version__ = "0.3.0"

__all__ = [
    "IAF",
    "MAF",
    "AutoARFlow",
    "ConditionalIAF",
    "ConditionalMAF",
    "FitResult",
    "FlowPrior",
    "GaussianAutoregressive",
    "GaussianPath",
    "ImportanceDraws",
    "LSTMConditioner",
    "LinearAutoregression",
    "MaskedConditioner",
    "Permutation",
    "available_flows",
    "build_flow",
    "conditional_iaf",
    "conditional_maf",
    "fit",
    "flush_finite_checks",
    "get_flow",
    "iaf",
    "importance_resample",
    "init_parameters",
    "linear_autoregression",
    "maf",
    "psis_khat",
    "register_flow",
    "to_inference_data",
]
