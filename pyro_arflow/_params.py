"""Keeping a PyroModule's plain ``nn.Module`` children in step with Pyro's param store."""

from __future__ import annotations

import pyro
from pyro.nn import PyroModule
from torch import nn


def synced_child(owner: PyroModule, name: str) -> nn.Module:
    """``owner.<name>``, registered with ``pyro.module`` and updated from the param store.

    PyroModule registers plain child modules without reading values back, so parameters
    loaded with ``pyro.get_param_store().load(...)`` would not reach them; this does.
    """
    child = owner._modules[name]
    return pyro.module(owner._pyro_get_fullname(name), child, update_module_params=True)
