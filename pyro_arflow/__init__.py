"""Gaussian autoregressive normalizing flows (IAF, MAF; MADE and LSTM conditioners) for Pyro."""

from typing import Any

from .conditioners import ConvConditioner, LSTMConditioner, MaskedConditioner
from .diagnostics import ImportanceDraws, importance_resample, psis_khat, to_inference_data
from .distributed import init_parameters
from .distributions import GaussianAutoregressive
from .fitting import FitResult, fit
from .guides import AutoARFlow
from .linear import LinearAutoregression, linear_autoregression
from .path_laplace import PathLaplaceApproximation
from .paths import GaussianPath
from .priors import FlowPrior
from .registry import available_flows, build_flow, get_flow, register_flow
from .transforms import (
    DEPRECATED_ALIASES,
    IAF,
    MAF,
    Permutation,
    conditional_iaf,
    conditional_maf,
    deprecated_alias,
    iaf,
    maf,
)
from .validation import flush_finite_checks
from .warm_start import LaplaceApproximation, laplace_warm_start

__version__ = "0.7.0"

__all__ = [
    "IAF",
    "MAF",
    "AutoARFlow",
    "ConvConditioner",
    "FitResult",
    "FlowPrior",
    "GaussianAutoregressive",
    "GaussianPath",
    "ImportanceDraws",
    "LSTMConditioner",
    "LaplaceApproximation",
    "LinearAutoregression",
    "MaskedConditioner",
    "PathLaplaceApproximation",
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
    "laplace_warm_start",
    "init_parameters",
    "linear_autoregression",
    "maf",
    "psis_khat",
    "register_flow",
    "to_inference_data",
]


def __getattr__(name: str) -> Any:
    """Names of version 0.3 that still work for one release, with a ``FutureWarning``."""
    if name in DEPRECATED_ALIASES:
        return deprecated_alias(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
