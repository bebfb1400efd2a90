"""Argument and input checks shared by every module of the package.

Shape, dtype and device checks are free and always on. The finiteness check follows Pyro's
validation switch (``pyro.enable_validation``, on by default) and stays out of JIT traces and
CUDA-graph captures. On the CPU it reads one reduction back at once. On CUDA it never blocks
the host: each check writes one number into a device buffer, which is copied back
asynchronously every few checks and read once the copy has landed, so a non-finite value is
reported (with the message of the call that produced it) some calls later, without a host
synchronization per layer; ``flush_finite_checks()`` waits for all of them.
"""

from __future__ import annotations

import difflib
import inspect
import math
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

    On CUDA the error may surface at a later check (see the module docstring); ``message``
    is then called later too, so it should hold no large tensor (a ``weakref`` to one is fine).
    """
    if not is_validation_enabled() or torch.jit.is_tracing() or value.numel() == 0:
        return
    if value.device.type != "cuda":
        if not _all_finite(value):
            raise ValueError(message())
        return
    if torch.cuda.is_current_stream_capturing():
        return
    checks = _DEFERRED.get(value.device)
    if checks is None:
        checks = _DEFERRED[value.device] = _DeferredChecks(value.device)
    checks.add(value, message)


def flush_finite_checks() -> None:
    """Wait for every deferred (CUDA) finiteness check and raise for the first that failed.

    On the CPU every check reads back at once, so there is nothing to wait for.

    Example::

        >>> import pyro_arflow as af
        >>> af.flush_finite_checks()  # after a run on CUDA: raises if a check failed
    """
    for checks in _DEFERRED.values():
        checks.flush()


class _DeferredChecks:
    """The deferred finiteness checks of one CUDA device.

    Each check is two small kernels: the largest magnitude of the value (nan if any entry is
    nan, inf if any is inf; a maximum cannot overflow), copied into a slot of a device buffer.
    When a bank of ``SLOTS`` slots is full it is copied to pinned host memory without
    blocking, and read once that copy has landed, at a later check; two banks alternate.
    """

    SLOTS = 16

    def __init__(
        self, device: torch.device, event: Callable[[], Any] = torch.cuda.Event, pin: bool = True
    ) -> None:
        self.event = event
        self.slots = [torch.empty(self.SLOTS, dtype=torch.float64, device=device) for _ in "ab"]
        self.host = [
            torch.empty(self.SLOTS, dtype=torch.float64, device="cpu", pin_memory=pin) for _ in "ab"
        ]
        self.messages: list[list[Message]] = [[], []]
        self.in_flight: list[Any] = [None, None]  # the event of each bank's copy
        self.bank = 0

    def add(self, value: Tensor, message: Message) -> None:
        self._read(1 - self.bank, wait=False)
        bank, index = self.bank, len(self.messages[self.bank])
        slot = self.slots[bank][index]
        # no autograd through a check; the norm in the value's own dtype (asking for float64
        # would cast the whole value first), then into the slot
        slot.copy_(torch.linalg.vector_norm(value.detach(), ord=math.inf))
        self.messages[bank].append(message)
        if index + 1 == self.SLOTS:
            self._send(bank)

    def flush(self) -> None:
        if self.messages[self.bank]:
            self._send(self.bank)
        for bank in (0, 1):
            self._read(bank, wait=True)

    def _send(self, bank: int) -> None:
        self._read(1 - bank, wait=True)  # its buffers are about to be reused
        count = len(self.messages[bank])
        self.host[bank][:count].copy_(self.slots[bank][:count], non_blocking=True)
        landed = self.event()
        landed.record()
        self.in_flight[bank] = landed
        self.bank = 1 - bank

    def _read(self, bank: int, wait: bool) -> None:
        landed = self.in_flight[bank]
        if landed is None:
            return
        if not landed.query():
            if not wait:
                return
            landed.synchronize()
        messages, self.messages[bank], self.in_flight[bank] = self.messages[bank], [], None
        finite = torch.isfinite(self.host[bank][: len(messages)])
        if not bool(finite.all()):
            self.messages = [[], []]  # the first failure explains the ones after it
            self.in_flight = [None, None]
            first = int((~finite).nonzero()[0])
            raise ValueError(messages[first]() + " (found on the GPU by a deferred check)")


_DEFERRED: dict[torch.device, _DeferredChecks] = {}


def _all_finite(value: Tensor) -> bool:
    """Whether every entry is finite; one reduction in the common case.

    A nan or inf entry makes the sum nan or inf, so a finite sum proves all entries finite;
    only a non-finite sum (bad entries, or finite ones overflowing) needs the full check.
    """
    return math.isfinite(value.sum().item()) or bool(torch.isfinite(value).all())
