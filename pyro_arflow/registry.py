"""Flows by name: ``register_flow``, ``get_flow``, ``available_flows``, ``build_flow``.

A *flow factory* builds one layer: ``factory(input_dim, context_dim=None, **kwargs)`` returns a
``Transform`` (a ``TransformModule`` to be trainable) when ``context_dim`` is ``None``, and a
``ConditionalTransformModule`` (or a context-free ``Transform``) otherwise. ``build_flow``
stacks ``num_flows`` of them, each conditioning on a different order of the variables: a
factory that takes an ``ordering`` argument is handed each layer's order; between the layers
of one that does not, ``build_flow`` puts a fixed :class:`~pyro_arflow.Permutation`.

Built-in names: ``"iaf"`` and ``"maf"`` (masked conditioner), ``"iaf-lstm"`` and
``"maf-lstm"`` (LSTM conditioner), ``"iaf-conv"`` and ``"maf-conv"`` (causal dilated
convolutions, whose size does not grow with the dimension). Each takes
``linear_autoregression``: follow every layer by a :class:`~pyro_arflow.LinearAutoregression`;
on by default for ``"iaf"`` only, the one flow that cannot otherwise learn a Markov path's
posterior quickly (measured in the user guide).
Other packages add flows through the ``pyro_arflow.flows`` entry-point group
(``name = "package.module:factory"``), loaded the first time a name is looked up that is not
registered yet; a plugin that fails to load gives a warning.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransform,
)
from pyro.distributions.torch_transform import ComposeTransformModule
from torch.distributions import Transform

from ._checks import check_keywords, check_positive_int
from .conditioners import make_conditioner
from .linear import LinearAutoregression
from .ordering import layer_orderings
from .scales import ScaleMap
from .transforms import IAF, MAF, Permutation

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

    Example::

        >>> import pyro_arflow as af
        >>> @af.register_flow("my-iaf")
        ... def my_iaf(input_dim, context_dim=None, **kwargs):
        ...     return af.iaf(input_dim, hidden_dims=[2 * input_dim], **kwargs)
        >>> "my-iaf" in af.available_flows(), af.get_flow("my-iaf") is my_iaf
        (True, True)
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
    """The registered flow names, plugins included, sorted.

    Example::

        >>> import pyro_arflow as af
        >>> [name for name in af.available_flows() if name.startswith("iaf")][:3]
        ['iaf', 'iaf-conv', 'iaf-lstm']
    """
    if not _plugins_loaded:
        _load_plugins()
    return sorted(_FLOWS)


def get_flow(name: str) -> FlowFactory:
    """The factory registered as ``name``; ``ValueError`` listing the available names otherwise.

    Example::

        >>> import pyro_arflow as af
        >>> layer = af.get_flow("maf")(4, hidden_dims=[8])
        >>> type(layer).__name__
        'MAF'
    """
    if name not in _FLOWS and not _plugins_loaded:
        _load_plugins()
    if not isinstance(name, str) or name not in _FLOWS:
        raise ValueError(
            f"unknown flow {name!r}{_suggestion(name)}; available flows: {available_flows()}"
        )
    return _FLOWS[name]


def _suggestion(name: Any) -> str:
    """``" (did you mean 'iaf-lstm'?)"`` for a name that differs from a registered one in case,
    separators or a typo; empty otherwise."""
    if not isinstance(name, str):
        return ""
    normalized = name.strip().lower().replace("_", "-").replace(" ", "-")
    if normalized in _FLOWS:
        return f" (did you mean {normalized!r}?)"
    close = difflib.get_close_matches(normalized, list(_FLOWS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_flow(
    name: str,
    input_dim: int,
    num_flows: int = 2,
    context_dim: int | None = None,
    orderings: str = "reversed",
    seed: int = 0,
    **kwargs: Any,
) -> ComposeTransformModule | ConditionalComposeTransformModule:
    """Stack ``num_flows`` layers of the flow ``name``, each in its own order of the variables.

    Arguments:
        name: a registered flow name (see :func:`available_flows`).
        input_dim: size of the vectors the flow acts on.
        num_flows: number of layers.
        context_dim: size of a context vector; if given, the result is conditional.
        orderings: how consecutive layers' orderings differ: ``"reversed"`` (the first
            natural, each next the reverse of the one before) or ``"random"`` (seeded by
            ``seed``). They are buffers, so they survive ``state_dict``. (``permutation=``,
            its name in version 0.3, still works for one release, with a warning.)
        seed: seed of the random orderings.
        kwargs: passed to every layer's factory (``hidden_dims``, ``hidden_size``, ...).

    Every part caches the pair it last computed, so a flow scoring its own sample walks back
    through the caches rather than solving an IAF's sequential inverse; the composition itself
    keeps no cache of its own (``copy.deepcopy`` and pickling of a used flow stay possible).

    Example::

        >>> import torch, pyro_arflow as af
        >>> flow = af.build_flow("iaf-lstm", 6, num_flows=3, hidden_size=8)
        >>> x = torch.randn(2, 6)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True
    """
    factory = get_flow(name)
    check_positive_int(input_dim, "input_dim")
    check_positive_int(num_flows, "num_flows")
    if context_dim is not None:
        check_positive_int(context_dim, "context_dim")
    if "permutation" in kwargs:
        warnings.warn(
            "build_flow(permutation=...) is deprecated and will be removed in the next release: "
            "use orderings=...",
            FutureWarning,
            stacklevel=2,
        )
        orderings = kwargs.pop("permutation")
    if "ordering" in kwargs:
        raise ValueError(
            "build_flow gives every layer its own ordering; choose how they differ with "
            "orderings='reversed' or 'random' (and seed), not ordering="
        )
    takes_ordering = "ordering" in inspect.signature(factory).parameters
    check_keywords(factory, kwargs, f"the flow {name!r}", skip=1)
    parts: list[Any] = []
    stack = layer_orderings(input_dim, num_flows, orderings, seed)
    for index, ordering in enumerate(stack):
        if takes_ordering:
            layer = factory(input_dim, context_dim=context_dim, ordering=ordering, **kwargs)
        else:
            if index > 0:  # values arrive in the previous ordering; rearrange them into this one
                parts.append(Permutation(stack[index - 1].argsort()[ordering]))
            layer = factory(input_dim, context_dim=context_dim, **kwargs)
        parts.append(_checked_layer(layer, name, context_dim))
    if context_dim is None:
        return ComposeTransformModule(parts)
    return ConditionalComposeTransformModule(parts)


def _checked_layer(layer: Any, name: str, context_dim: int | None) -> Any:
    kinds: tuple[type, ...] = (
        (Transform,)
        if context_dim is None
        else (
            Transform,
            ConditionalTransform,
        )
    )
    if not isinstance(layer, kinds):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise ValueError(
            f"the factory of flow {name!r} returned {type(layer).__name__}, expected a {expected}"
        )
    return layer


def _builtin(layer_class: type, conditioner: str, linear_default: bool = False) -> FlowFactory:
    """The factory of one built-in layer kind with one conditioner.

    With ``linear_autoregression`` the layer is followed by a
    :class:`~pyro_arflow.LinearAutoregression` in the same ordering (see there why the masked
    IAF wants it), banded when ``bandwidth`` is given.
    """

    def factory(
        input_dim: int,
        context_dim: int | None = None,
        ordering: Any = "natural",
        scale_map: str | ScaleMap = "softplus",
        linear_autoregression: bool = linear_default,
        bandwidth: int | None = None,
        **conditioner_kwargs: Any,
    ) -> Any:
        if "conditioner" in conditioner_kwargs:
            raise ValueError(
                f"the flow {layer_class.__name__.lower()}'s conditioner is fixed "
                f"({conditioner}); pick the flow by name instead: {available_flows()}"
            )
        network = make_conditioner(
            conditioner, input_dim, context_dim, ordering=ordering, **conditioner_kwargs
        )
        layer = layer_class(network, scale_map)
        if bandwidth is not None and not linear_autoregression:
            raise ValueError(
                f"bandwidth={bandwidth!r} is the linear autoregressions'; pass "
                "linear_autoregression=True with it"
            )
        if not linear_autoregression:
            return layer
        linear = LinearAutoregression(input_dim, ordering, bandwidth=bandwidth)
        if context_dim is None:
            return ComposeTransformModule([layer, linear])
        return ConditionalComposeTransformModule([layer, linear])

    extra = ", then a LinearAutoregression" if linear_default else ""
    factory.__doc__ = f"One {layer_class.__name__} layer with the {conditioner} conditioner{extra}."
    return factory


register_flow("iaf", _builtin(IAF, "masked", linear_default=True))
register_flow("maf", _builtin(MAF, "masked"))
register_flow("iaf-lstm", _builtin(IAF, "lstm"))
register_flow("maf-lstm", _builtin(MAF, "lstm"))
register_flow("iaf-conv", _builtin(IAF, "conv"))
register_flow("maf-conv", _builtin(MAF, "conv"))
