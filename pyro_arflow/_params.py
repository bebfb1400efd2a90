"""A PyroModule's plain ``nn.Module`` child, kept in step with Pyro's param store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyro
from pyro.distributions import constraints
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import effectful
from torch import nn


def store_name(owner: PyroModule, child: str) -> str:
    """The name under which Pyro's param store knows ``owner.<child>``.

    It is the one PyroModule itself would use: the owner's Pyro name (the ``name`` given to a
    root module, or its path inside a parent PyroModule), a dot, the attribute. PyroModule
    computes it only inside a call of the module; it is built here from the same attribute so
    that it is known before the first call too (``median()`` on a fresh guide, right after
    ``ParamStore.load``).
    """
    prefix = owner._pyro_name
    return f"{prefix}.{child}" if prefix else child


def synced_child(owner: PyroModule, child: str) -> nn.Module:
    """``owner.<child>``, registered in Pyro's param store, with the store's values read back.

    With ``pyro.settings.set(module_local_params=True)`` the module keeps its own parameters
    and the global store is not touched. Otherwise: PyroModule registers a plain child module
    with ``pyro.module(..., update_module_params=False)``: its parameters enter the store, but
    values the store holds under the same names (loaded by ``ParamStore.load``, or registered
    by another module of the same name) never reach it, so a loaded checkpoint would silently
    not take effect. Registering with
    ``update_module_params=True`` makes the store's values the module's, as PyroModule already
    does for its ``PyroParam`` attributes; modules of one name share their parameters, as
    Pyro's autoguides of one class do. A stored value of another shape is a ``ValueError``
    naming the parameter, not a shape error deep inside the flow.

    A frozen module (no parameter requires a gradient: a trained guide preconditioning
    NUTS through ``NeuTraReparam``, say) is used as it is: Pyro's store only tracks
    trainable parameters, and would warn at every call.
    """
    module = owner._modules[child]
    if not any(parameter.requires_grad for parameter in module.parameters()):
        return module
    name = store_name(owner, child)
    if pyro.settings.get("module_local_params"):
        # parameters belong to the module (as for distributed training): announce them to
        # Pyro's handlers, as PyroModule does in this mode, and leave the global store alone
        for parameter_name, parameter in module.named_parameters():
            full_name = param_with_module_name(name, parameter_name)
            effectful(type="param")(lambda *_, value=parameter, **__: value)(
                full_name, parameter, constraint=constraints.real, name=full_name
            )
        return module
    store = pyro.get_param_store()
    for parameter_name, parameter in module.named_parameters():
        full_name = param_with_module_name(name, parameter_name)
        if full_name in store and store[full_name].shape != parameter.shape:
            raise ValueError(
                f"Pyro's param store holds {full_name!r} with shape "
                f"{tuple(store[full_name].shape)}, but this {type(owner).__name__} needs shape "
                f"{tuple(parameter.shape)}: two modules of the same name share parameters. "
                "Give this one its own name, or pyro.clear_param_store()"
            )
    return pyro.module(name, module, update_module_params=True)


@contextmanager
def module_context(owner: PyroModule) -> Iterator[None]:
    """Run a block as if inside a call of ``owner``, so that its ``PyroParam`` attributes and
    synced children read Pyro's param store (outside a call PyroModule cannot name them and
    returns the module's own values). For helpers such as ``AutoARFlow.median`` that read a
    guide without running it."""
    with owner._pyro_context:
        yield
