"""Doctests (``--doctest-modules`` over the package) start, as every test does, from an empty
param store and a fixed seed: Pyro's store is global, and the examples build guides of one
class."""

from __future__ import annotations

import pyro
import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def fresh_pyro_state_for_doctests(request: pytest.FixtureRequest):
    if isinstance(request.node, DoctestItem):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
    yield
