r"""Orderings: the order in which an autoregressive layer visits the positions of its vector.

One word for one concept. An *ordering* is a permutation :math:`o` of :math:`0..D-1`:
position :math:`o_t` is visited :math:`t`-th, and its conditional reads the positions visited
before it. Every layer takes it as ``ordering=`` (``"natural"``, ``"reversed"``, ``"random"``
with ``seed``, or an explicit permutation) and holds it as two buffers:

* ``ordering`` (saved in the state dict): :math:`o`, ``ordering[t]`` = the position visited
  ``t``-th;
* ``inverse_ordering`` (derived, not saved): :math:`o^{-1}`, ``inverse_ordering[i]`` = when
  position ``i`` is visited (MADE's degree of input ``i``).

A stack of layers takes ``orderings=`` (:func:`~pyro_arflow.build_flow`): how the orderings of
consecutive layers differ. (:class:`~pyro_arflow.Permutation` is not an ordering: it is the
transform that reorders a vector's values, under Pyro's name for it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ORDERING_NAMES",
    "Ordering",
    "layer_orderings",
    "register_ordering",
    "resolve_ordering",
]

Ordering = str | Sequence[int] | Tensor
"""What ``ordering=`` takes: one of :data:`ORDERING_NAMES` or an explicit permutation."""

ORDERING_NAMES = ("natural", "reversed", "random")
"""The named orderings."""


def resolve_ordering(input_dim: int, ordering: Ordering = "natural", seed: int = 0) -> Tensor:
    """The permutation ``o`` with ``o[t]`` = the position visited ``t``-th, on the default
    device (where a module's buffers are created).

    Arguments:
        input_dim: number of positions ``D``.
        ordering: ``"natural"`` (0..D-1), ``"reversed"``, ``"random"`` (seeded), or an explicit
            permutation of ``range(D)``: a 1-D sequence or tensor of integers.
        seed: seed of the ``"random"`` ordering.

    Example::

        >>> from pyro_arflow.ordering import resolve_ordering
        >>> resolve_ordering(4, "reversed").tolist(), resolve_ordering(3, [2, 0, 1]).tolist()
        ([3, 2, 1, 0], [2, 0, 1])
    """
    return _resolve_on_cpu(input_dim, ordering, seed).to(torch.empty(0).device)


def _resolve_on_cpu(input_dim: int, ordering: Ordering, seed: int) -> Tensor:
    if isinstance(ordering, str):
        if ordering == "natural":
            return torch.arange(input_dim, device="cpu")
        if ordering == "reversed":
            return torch.arange(input_dim - 1, -1, -1, device="cpu")
        if ordering == "random":
            generator = torch.Generator().manual_seed(seed)
            return torch.randperm(input_dim, generator=generator, device="cpu")
        raise ValueError(
            f"unknown ordering {ordering!r}; expected one of {ORDERING_NAMES} "
            "or a permutation of range(input_dim)"
        )
    given = (
        ordering.cpu()
        if isinstance(ordering, Tensor)
        else torch.tensor(list(ordering), device="cpu")
    )
    if given.dim() != 1 or given.dtype in (torch.bool, torch.uint8) or given.is_floating_point():
        raise ValueError(
            f"an explicit ordering must be a 1-D sequence of integers, got {given.dim()}-D "
            f"{given.dtype} {ordering!r}"
        )
    permutation = given.to(torch.long)
    if not torch.equal(permutation.sort().values, torch.arange(input_dim, device="cpu")):
        raise ValueError(
            f"an explicit ordering must be a permutation of range({input_dim}), "
            f"got {permutation.tolist()}"
        )
    return permutation.clone()


def layer_orderings(input_dim: int, num_layers: int, orderings: str, seed: int) -> list[Tensor]:
    """The orderings of ``num_layers`` stacked layers, on the CPU: the first natural, then each
    one either the reverse of the one before (``"reversed"``) or a fresh seeded permutation
    (``"random"``).

    Example::

        >>> from pyro_arflow.ordering import layer_orderings
        >>> [o.tolist() for o in layer_orderings(3, 3, "reversed", seed=0)]
        [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    """
    if orderings not in ("reversed", "random"):
        raise ValueError(f"orderings must be 'reversed' or 'random', got {orderings!r}")
    generator = torch.Generator().manual_seed(seed)
    result = [torch.arange(input_dim, device="cpu")]
    for _ in range(num_layers - 1):
        if orderings == "reversed":
            result.append(result[-1].flip(0))
        else:
            result.append(torch.randperm(input_dim, generator=generator, device="cpu"))
    return result


def register_ordering(module: nn.Module, ordering: Tensor) -> None:
    """Give ``module`` the buffers ``ordering`` and ``inverse_ordering`` (see the module
    docstring), kept consistent through ``load_state_dict``.

    After a load brings another ordering, ``inverse_ordering`` is rebuilt and then the
    module's ``_ordering_loaded()`` is called, if it has one, to rebuild whatever else it
    derives from the ordering (a MADE network's masks). State dicts saved under this
    package's earlier key ``order`` still load.

    Example::

        >>> import torch
        >>> from pyro_arflow.ordering import register_ordering, resolve_ordering
        >>> module = torch.nn.Module()
        >>> register_ordering(module, resolve_ordering(3, [2, 0, 1]))
        >>> module.inverse_ordering.tolist(), list(module.state_dict())
        ([1, 2, 0], ['ordering'])
    """
    module.register_buffer("ordering", ordering)
    module.register_buffer("inverse_ordering", torch.argsort(ordering), persistent=False)
    module._register_load_state_dict_pre_hook(_accept_earlier_key, with_module=True)
    module.register_load_state_dict_post_hook(_rebuild_after_load)


def _accept_earlier_key(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Version 0.3 saved the ordering as ``order``; load it as ``ordering``."""
    earlier = prefix + "order"
    if earlier in state_dict and prefix + "ordering" not in state_dict:
        state_dict[prefix + "ordering"] = state_dict.pop(earlier)


def _rebuild_after_load(module: nn.Module, incompatible_keys: object) -> None:
    # module-level functions, not closures, so that modules holding them pickle
    module.inverse_ordering.copy_(torch.argsort(module.ordering))
    rebuild = getattr(module, "_ordering_loaded", None)
    if rebuild is not None:
        rebuild()
