"""Argument and input checks shared by every module of the package.

Shape, dtype and device checks are free and always on. The finiteness check follows Pyro's
validation switch (``pyro.enable_validation``, on by default) and stays out of JIT traces and
CUDA-graph captures. On the CPU it reads one reduction back at once. On CUDA it never blocks
the host: the flag is copied back asynchronously and read at the next check whose copy has
landed, so a non-finite value is reported (with the message of the call that produced it) one
or more calls later, without a host synchronization per layer.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.distributions.util import is_validation_enabled
from torch import Tensor

__all__ = [
    "check_context",
    "check_event",
    "check_finite",
    "check_keywords",
    "check_positive_int",
    "flush_finite_checks",
]

Message = Callable[[], str]
"""Builds an error message; called only when a check fails."""


def check_positive_int(value: Any, name: str) -> int:
    """``value`` if it is an ``int`` >= 1 (``bool`` is not), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_keywords(target: Callable, given: Iterable[str], what: str, skip: int = 0) -> None:
    """``ValueError`` unless every name in ``given`` is a keyword ``target`` accepts.

    Arguments:
        target: a callable (a class checks its ``__init__``); one taking ``**kwargs`` accepts all.
        given: the keyword names a caller passes on.
        what: how the message names ``target``.
        skip: leading parameters that are not the caller's to set (``input_dim``, ...).
    """
    parameters = list(inspect.signature(target).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for name in given:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{what} takes no argument {name!r}{hint}; it takes {', '.join(accepted)}"
            )


def check_event(
    value: Any, size: int, name: str, like: Tensor | None = None, finite: bool = True
) -> None:
    """``ValueError`` unless ``value`` is a tensor of shape ``(..., size)``, of the dtype and on
    the device of ``like`` (a parameter of the network that will read it), and (if ``finite``)
    all finite."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}), got shape {tuple(value.shape)}")
    if like is not None:
        if value.dtype != like.dtype:
            raise ValueError(
                f"{name} has dtype {value.dtype} but the network's parameters have dtype "
                f"{like.dtype}; convert one of them (module.to(dtype) or value.to(dtype))"
            )
        if value.device != like.device:
            raise ValueError(
                f"{name} is on {value.device} but the network's parameters are on {like.device}"
            )
    if finite:
        check_finite(value, lambda: f"{name} has non-finite entries (nan or inf)")


def check_context(
    context: Any, context_dim: int | None, like: Tensor | None = None, finite: bool = True
) -> None:
    """``ValueError`` unless a context is given exactly when the network expects one."""
    if context_dim is None:
        if context is not None:
            raise ValueError("this network takes no context, but a context was given")
        return
    if context is None:
        raise ValueError(f"this network expects a context of shape (..., {context_dim}), got None")
    check_event(context, context_dim, "context", like, finite)


def check_finite(value: Tensor, message: Message) -> None:
    """Under validation, ``ValueError(message())`` when ``value`` has a nan or inf entry.

    On CUDA the error may surface at a later check (see the module docstring).
    """
    if not is_validation_enabled() or torch.jit.is_tracing() or value.numel() == 0:
        return
    if value.device.type != "cuda":
        if not _all_finite(value):
            raise ValueError(message())
        return
    if torch.cuda.is_current_stream_capturing():
        return
    _raise_landed_failures()
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)  # pinned: the copy is async
    flag.copy_(torch.isfinite(value).all(), non_blocking=True)
    landed = torch.cuda.Event()
    landed.record()
    _PENDING.append((flag, landed, message))


def flush_finite_checks() -> None:
    """Wait for every deferred (CUDA) finiteness check and raise for the first that failed."""
    for _, landed, _ in _PENDING:
        landed.synchronize()
    _raise_landed_failures()


_PENDING: deque[tuple[Tensor, Any, Message]] = deque()
"""Deferred CUDA checks: (host copy of the all-finite flag, event of its copy, message)."""


def _raise_landed_failures() -> None:
    while _PENDING and _PENDING[0][1].query():
        flag, _, message = _PENDING.popleft()
        if not bool(flag):
            _PENDING.clear()  # the first failure explains the ones after it
            raise ValueError(message() + " (found on the GPU by a deferred check)")


def _all_finite(value: Tensor) -> bool:
    """Whether every entry is finite; one reduction in the common case.

    A nan or inf entry makes the sum nan or inf, so a finite sum proves all entries finite;
    only a non-finite sum (bad entries, or finite ones overflowing) needs the full check.
    """
    return math.isfinite(value.sum().item()) or bool(torch.isfinite(value).all())
