"""Argument checks shared by every module of the package: types, sizes, keywords, and the shape,
dtype and device of a tensor a network will read. They are free and always on; the checks of
computed values (finiteness) live in :mod:`pyro_arflow.validation`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from .validation import check_finite

__all__ = [
    "check_context",
    "check_event",
    "check_keywords",
    "check_positive_int",
]


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
