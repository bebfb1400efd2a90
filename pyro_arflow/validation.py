"""Validation of computed values: finiteness checks, deferred on the GPU, and the diagnosis of a
non-finite result.

The finiteness check follows Pyro's validation switch (``pyro.enable_validation``, on by
default) and stays out of JIT traces and CUDA-graph captures. On the CPU it reads one reduction
back at once. On CUDA it never blocks the host: each check writes one number into a device
buffer, which is copied back asynchronously every few checks and read once the copy has
landed, so a non-finite value is reported (with the message of the call that produced it)
some calls later, without a host synchronization per layer; :func:`flush_finite_checks` waits
for all of them.

A message is a function, called only when a check fails. :func:`non_finite_message` builds the
one every layer uses: it tells apart a non-finite input or context, diverged parameters and an
overflow, which is what a user needs to know to mend a run.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.distributions.util import is_validation_enabled
from torch import Tensor, nn

__all__ = ["Message", "check_finite", "flush_finite_checks", "non_finite_message"]

Message = Callable[[], str]
"""Builds an error message; called only when a check fails."""


def check_finite(value: Tensor, message: Message) -> None:
    """Under validation, ``ValueError(message())`` when ``value`` has a nan or inf entry.

    On CUDA the error may surface at a later check (see the module docstring); ``message``
    is then called later too, so it should hold no large tensor (a ``weakref`` to one is fine).

    Example::

        >>> import torch
        >>> from pyro_arflow.validation import check_finite
        >>> check_finite(torch.ones(3), lambda: "never built")
        >>> check_finite(torch.tensor([1.0, float("inf")]), lambda: "x overflowed")
        Traceback (most recent call last):
          ...
        ValueError: x overflowed
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


def non_finite_message(
    name: str, network: nn.Module, inputs: Mapping[str, Tensor | None], what: str
) -> Message:
    """The message of a non-finite result of ``network``, built only if a check fails.

    Arguments:
        name: how the message names the computation (``"IAF layer (input_dim=5)"``).
        network: the module whose parameters may have diverged.
        inputs: the tensors the computation read, by label (``{"input": x, "context": c}``);
            ``None`` entries are skipped.
        what: the part of the computation that was checked (``"log-determinant"``, ...).

    The message names the first of: an input with non-finite entries, non-finite parameters
    (training diverged: with the remedy), an input freed before a deferred GPU check could
    look at it, or an overflow of the dtype. It holds weak references to the inputs, since a
    deferred check may call it a few calls later.

    Example::

        >>> import torch
        >>> from pyro_arflow.validation import non_finite_message
        >>> x = torch.tensor([1.0, float("nan")])
        >>> message = non_finite_message("layer", torch.nn.Linear(2, 2), {"input": x}, "output")
        >>> message()
        'the layer got an input with non-finite entries (nan or inf)'
    """
    references = [
        (weakref.ref(value), label) for label, value in inputs.items() if value is not None
    ]
    dtype = next(value.dtype for value in inputs.values() if value is not None)

    def message() -> str:
        gone = []
        for reference, label in references:
            given = reference()
            if given is None:
                gone.append(label)  # freed before a deferred (GPU) check could look at it
            elif not bool(torch.isfinite(given).all()):
                return f"the {name} got an {label} with non-finite entries (nan or inf)"
        diverged = [
            parameter_name
            for parameter_name, parameter in network.named_parameters()
            if not bool(torch.isfinite(parameter).all())
        ]
        if diverged:
            return (
                f"the {name} has non-finite parameters ({', '.join(diverged)}): training has "
                "diverged. Lower the learning rate or clip the gradients, e.g. "
                "pyro.optim.ClippedAdam({'lr': 1e-3, 'clip_norm': 10.0})"
            )
        if gone:
            return (
                f"the {name} produced non-finite values in its {what}; its {' and '.join(gone)} "
                "had been freed before the check could tell whether they were finite"
            )
        return (
            f"the {name} produced non-finite values in its {what} from a finite input: they "
            f"overflow {dtype}; use float64, or inputs of a smaller scale"
        )

    return message
