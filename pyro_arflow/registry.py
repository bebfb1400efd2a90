"""Flows by name: ``register_flow``, ``get_flow``, ``available_flows``, ``build_flow``.

A *flow factory* builds one layer: ``factory(input_dim, context_dim=None, **kwargs)`` returns a
``TransformModule`` (``context_dim=None``) or a ``ConditionalTransformModule``. ``build_flow``
stacks ``num_flows`` of them with a fixed permutation between consecutive layers, so each layer
conditions on a different order of the variables.

Built-in names: ``"iaf"`` and ``"maf"`` (masked conditioner), ``"iaf-lstm"`` and
``"maf-lstm"`` (LSTM conditioner). Other packages add flows through the ``pyro_arflow.flows``
entry-point group (``name = "package.module:factory"``), loaded the first time a name is
looked up that is not registered yet; a plugin that fails to load gives a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

from .transforms import Permutation, conditional_iaf, conditional_maf, iaf, maf

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_flows",
    "build_flow",
    "get_flow",
    "register_flow",
]

ENTRY_POINT_GROUP = "pyro_arflow.flows"

FlowFactory = Callable[..., Any]
F = TypeVar("F", bound=FlowFactory)

_FLOWS: dict[str, FlowFactory] = {}
_plugins_loaded = False


def register_flow(name: str, factory: F | None = None) -> Any:
    """Register ``factory`` as ``name``: ``register_flow(name, f)`` or ``@register_flow(name)``.

    Registering a different factory under a taken name raises ``ValueError``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a flow name must be a non-empty string, got {name!r}")

    def register(fn: F) -> F:
        if not callable(fn):
            raise ValueError(f"a flow factory must be callable, got {fn!r}")
        if _FLOWS.get(name, fn) is not fn:
            raise ValueError(f"a different flow is already registered as {name!r}")
        _FLOWS[name] = fn
        return fn

    return register if factory is None else register(factory)


def _load_plugins() -> None:
    global _plugins_loaded
    _plugins_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _FLOWS:
            continue
        try:
            register_flow(entry_point.name, entry_point.load())
        except Exception as error:  # a broken plugin must not break the package
            warnings.warn(
                f"could not load flow {entry_point.name!r} from entry point "
                f"{entry_point.value!r}: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )


def available_flows() -> list[str]:
    """The registered flow names, plugins included, sorted."""
    if not _plugins_loaded:
        _load_plugins()
    return sorted(_FLOWS)


def get_flow(name: str) -> FlowFactory:
    """The factory registered as ``name``; ``ValueError`` listing the available names otherwise."""
    if name not in _FLOWS and not _plugins_loaded:
        _load_plugins()
    if name not in _FLOWS:
        raise ValueError(f"unknown flow {name!r}; available flows: {available_flows()}")
    return _FLOWS[name]


def build_flow(
    name: str,
    input_dim: int,
    num_flows: int = 2,
    context_dim: int | None = None,
    permutation: str = "reversed",
    seed: int = 0,
    **kwargs: Any,
) -> ComposeTransformModule | ConditionalComposeTransformModule:
    """Stack ``num_flows`` layers of the flow ``name`` with a permutation between consecutive ones.

    Arguments:
        name: a registered flow name (see :func:`available_flows`).
        input_dim: size of the vectors the flow acts on.
        num_flows: number of layers.
        context_dim: size of a context vector; if given, the result is conditional.
        permutation: ``"reversed"`` or ``"random"`` (seeded by ``seed``); stored as buffers, so
            it survives ``state_dict``.
        seed: seed of the random permutations.
        kwargs: passed to every layer's factory (``hidden_dims``, ``hidden_size``, ...).
    """
    factory = get_flow(name)
    if not (isinstance(input_dim, int) and input_dim >= 1):
        raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
    if not (isinstance(num_flows, int) and num_flows >= 1):
        raise ValueError(f"num_flows must be a positive int, got {num_flows!r}")
    if permutation not in ("reversed", "random"):
        raise ValueError(f"permutation must be 'reversed' or 'random', got {permutation!r}")
    generator = torch.Generator().manual_seed(seed)
    parts: list[Any] = []
    for index in range(num_flows):
        if index > 0:
            order = (
                torch.arange(input_dim - 1, -1, -1)
                if permutation == "reversed"
                else torch.randperm(input_dim, generator=generator)
            )
            parts.append(Permutation(order))
        parts.append(factory(input_dim, context_dim=context_dim, **kwargs))
    # Cached, so a flow scoring its own sample walks back through the cache rather than
    # solving an IAF's sequential inverse.
    if context_dim is None:
        return ComposeTransformModule(parts, cache_size=1)
    return ConditionalComposeTransformModule(parts, cache_size=1)


def _builtin(
    plain: Callable[..., Any], conditional: Callable[..., Any], conditioner: str
) -> FlowFactory:
    def factory(input_dim: int, context_dim: int | None = None, **kwargs: Any) -> Any:
        if context_dim is None:
            return plain(input_dim, conditioner=conditioner, **kwargs)
        return conditional(input_dim, context_dim, conditioner=conditioner, **kwargs)

    factory.__doc__ = f"One {plain.__name__.upper()} layer with the {conditioner} conditioner."
    return factory


register_flow("iaf", _builtin(iaf, conditional_iaf, "masked"))
register_flow("maf", _builtin(maf, conditional_maf, "masked"))
register_flow("iaf-lstm", _builtin(iaf, conditional_iaf, "lstm"))
register_flow("maf-lstm", _builtin(maf, conditional_maf, "lstm"))
