"""Input checks shared by conditioners, transforms and distributions.

Shape checks are free and always on. The finiteness check reads a value back from the
device, so it follows Pyro's validation switch (``pyro.enable_validation``, on by default)
and stays out of JIT traces.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.util import is_validation_enabled
from torch import Tensor


def check_event(value: Tensor, size: int, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a tensor of shape ``(..., size)``, all finite."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}), got shape {tuple(value.shape)}")
    if is_validation_enabled() and not torch.jit.is_tracing() and not all_finite(value):
        raise ValueError(f"{name} has non-finite entries (nan or inf)")


def all_finite(value: Tensor) -> bool:
    """Whether every entry is finite; one reduction in the common case.

    A nan or inf entry makes the sum nan or inf, so a finite sum proves all entries finite;
    only a non-finite sum (bad entries, or finite ones overflowing) needs the full check.
    """
    return math.isfinite(value.sum().item()) or bool(torch.isfinite(value).all())


def check_context(context: Tensor | None, context_dim: int | None) -> None:
    """Raise ``ValueError`` unless a context is given exactly when the network expects one."""
    if context_dim is None:
        if context is not None:
            raise ValueError("this network takes no context, but a context was given")
        return
    if context is None:
        raise ValueError(f"this network expects a context of shape (..., {context_dim}), got None")
    check_event(context, context_dim, "context")
