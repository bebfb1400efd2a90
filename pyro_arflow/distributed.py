"""Training across processes: this package's part is to have every parameter exist in time.

Data-parallel training goes through ``torch.distributed`` and Pyro's ``ELBOModule``
(``Trace_ELBO()(model, guide)``, an ``nn.Module`` whose forward is the differentiable loss),
wrapped in ``torch.nn.parallel.DistributedDataParallel``, which averages the gradients; nothing
here averages, broadcasts or shards anything. The recipe, on every rank::

    pyro.settings.set(module_local_params=True)        # parameters live in the modules
    elbo = Trace_ELBO()(model, guide)
    af.init_parameters(elbo, *first_batch)             # a lazily built guide's parameters
    ddp = DistributedDataParallel(elbo)                # ... exist before DDP looks for them
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    for batch in loader:                               # a DistributedSampler shards the data
        loss = ddp(*batch)                             # the model's data plate is
        loss.backward()                                # pyro.plate(..., size=N, subsample=idx)
        optimizer.step(); optimizer.zero_grad()        # with the global size N

Each rank's loss then estimates the whole data set's negative ELBO (the plate scales its shard
by ``N / len(idx)``), and DDP's average of the ranks' gradients is the gradient of the
average of those estimates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from torch import nn

__all__ = ["init_parameters"]


def init_parameters(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Call ``module(*args, **kwargs)`` once without gradients, so that every parameter built
    lazily (an autoguide's, at its first call) exists; return ``module``.

    Wrap the module in ``DistributedDataParallel`` after this: DDP registers the parameters
    that exist when it is built, and gradients of later ones would never be averaged (the
    ranks would drift apart without an error). Needs ``pyro.settings.set(module_local_params=
    True)``, so that parameters belong to their modules rather than to Pyro's global param
    store, which could replace them behind DDP's back.

    Arguments:
        module: an ``ELBOModule`` (``Trace_ELBO()(model, guide)``), a guide, or any module.
        args, kwargs: one batch, as the module will be called with.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> with pyro.settings.context(module_local_params=True):
        ...     elbo = pyro.infer.Trace_ELBO()(model, af.AutoARFlow(model, hidden_dims=[4]))
        ...     before = len(list(elbo.parameters()))  # none before the guide's first call
        ...     after = len(list(af.init_parameters(elbo).parameters()))
        >>> before, after > 0
        (0, True)
    """
    if not pyro.settings.get("module_local_params"):
        raise ValueError(
            "distributed training needs parameters that live in their modules: call "
            "pyro.settings.set(module_local_params=True) before building the model and guide"
        )
    with torch.no_grad(), _first_calls_allowed():
        module(*args, **kwargs)
    return module


_INITIALIZING = [False]


@contextmanager
def _first_calls_allowed() -> Iterator[None]:
    """While active, guides may build their parameters inside a distributed run."""
    _INITIALIZING.append(True)
    try:
        yield
    finally:
        _INITIALIZING.pop()


def check_lazy_parameters_may_appear(owner: str) -> None:
    """``ValueError`` when ``owner`` is about to create its parameters inside a distributed
    run, outside :func:`init_parameters`: DDP, built before, would never average them."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not _INITIALIZING[-1]:
        raise ValueError(
            f"{owner} is creating its parameters at its first call, inside a distributed run: "
            "a DistributedDataParallel built before would not average their gradients. Call "
            "pyro_arflow.init_parameters(elbo_module, *first_batch) before wrapping it"
        )
