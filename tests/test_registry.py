"""The flow registry: built-ins, build_flow stacking, entry-point plugins, errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

import pyro_arflow as af
from conftest import perturb
from pyro_arflow import registry


@pytest.fixture
def isolated_registry(monkeypatch):
    """Each test sees the built-ins only, with plugins not yet loaded."""
    monkeypatch.setattr(registry, "_FLOWS", dict(registry._FLOWS))
    monkeypatch.setattr(registry, "_plugins_loaded", False)


def test_builtin_names():
    assert {"iaf", "maf", "iaf-lstm", "maf-lstm"} <= set(af.available_flows())
    assert isinstance(af.build_flow("iaf", 3)[0][0], af.IAF)  # then a LinearAutoregression
    assert isinstance(af.build_flow("maf-lstm", 3)[0].conditioner, af.LSTMConditioner)


@pytest.mark.parametrize("name", ["iaf", "maf", "iaf-lstm", "maf-lstm"])
def test_build_flow_gives_each_builtin_layer_its_own_order(name):
    flow = af.build_flow(name, 4, num_flows=3, linear_autoregression=False)
    assert isinstance(flow, ComposeTransformModule)
    layer = af.IAF if name.startswith("iaf") else af.MAF
    assert [type(part) for part in flow.parts] == [layer] * 3  # no permutations in between
    orders = [part.conditioner.ordering.tolist() for part in flow.parts]
    assert orders == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]
    assert flow.sign == 1
    conditional = af.build_flow(name, 4, num_flows=2, context_dim=3)  # with the default layers
    assert isinstance(conditional, ConditionalComposeTransformModule)
    x = torch.randn(5, 4, dtype=torch.float64)
    transform = perturb(conditional.double()).condition(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(transform.inv(transform(x).clone()), x, atol=1e-10, rtol=0)


def test_random_orders_are_buffers_that_survive_state_dict():
    flow = perturb(af.build_flow("iaf", 6, num_flows=3, orderings="random", seed=1))
    other = af.build_flow("iaf", 6, num_flows=3, orderings="random", seed=2)
    assert not torch.equal(flow[1][0].conditioner.ordering, other[1][0].conditioner.ordering)
    state = flow.state_dict()
    assert "1.0.conditioner.ordering" in state and "1.1.ordering" in state
    assert not any("mask" in key for key in state)  # derived from the order, not stored
    other.load_state_dict(state)
    x = torch.randn(4, 6)
    assert torch.equal(other(x), flow(x))  # the masks were rebuilt from the loaded order


def test_a_factory_without_ordering_gets_permutations_between_its_layers(isolated_registry):
    af.register_flow("plain-iaf", lambda input_dim, context_dim=None: af.iaf(input_dim))
    flow = perturb(af.build_flow("plain-iaf", 4, num_flows=3).double())
    assert [type(part) for part in flow.parts] == [
        af.IAF,
        af.Permutation,
        af.IAF,
        af.Permutation,
        af.IAF,
    ]
    assert flow.parts[1].permutation.tolist() == [3, 2, 1, 0]
    assert flow.sign == 1  # two transpositions in each reversal of 4: even
    assert af.Permutation(torch.tensor([1, 0, 2])).sign == -1
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(flow.inv(flow(x).clone()), x, atol=1e-10, rtol=0)


def test_register_flow_as_decorator_and_call(isolated_registry):
    @af.register_flow("tiny-iaf")
    def tiny(input_dim, context_dim=None, **kwargs):
        return af.iaf(input_dim, hidden_dims=[4])

    assert af.get_flow("tiny-iaf") is tiny
    af.register_flow("tiny-iaf", tiny)  # the same factory again is fine
    with pytest.raises(ValueError, match="different flow is already registered as 'tiny-iaf'"):
        af.register_flow("tiny-iaf", lambda input_dim, context_dim=None: None)
    assert af.build_flow("tiny-iaf", 3, num_flows=2)[0].conditioner.hidden_dims == [4]


def test_entry_point_plugins_load_lazily_and_broken_ones_warn(
    isolated_registry, tmp_path, monkeypatch
):
    (tmp_path / "fake_arflow_plugin.py").write_text(
        textwrap.dedent(
            """
            import pyro_arflow as af

            def reversed_iaf(input_dim, context_dim=None, **kwargs):
                return af.iaf(input_dim, ordering="reversed", **kwargs)
            """
        )
    )
    info = tmp_path / "fake_arflow_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-arflow-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[pyro_arflow.flows]\n"
        "reversed-iaf = fake_arflow_plugin:reversed_iaf\n"
        "broken-flow = no_such_module_anywhere:factory\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_arflow_plugin", raising=False)
    assert "reversed-iaf" not in registry._FLOWS  # nothing loaded before a lookup
    with pytest.warns(RuntimeWarning, match="broken-flow.*no_such_module_anywhere"):
        factory = af.get_flow("reversed-iaf")
    layer = af.build_flow("reversed-iaf", 3, num_flows=1)[0]
    assert factory.__module__ == "fake_arflow_plugin"
    assert layer.conditioner.ordering.tolist() == [2, 1, 0]
    assert "reversed-iaf" in af.available_flows() and "broken-flow" not in af.available_flows()


def test_bad_names_and_arguments_raise_value_error(isolated_registry):
    with pytest.raises(
        ValueError, match=r"unknown flow 'nice'; available flows: \['iaf', 'iaf-conv', 'iaf-lstm'"
    ):
        af.get_flow("nice")
    with pytest.raises(ValueError, match="unknown flow"):
        af.build_flow("nice", 3)
    with pytest.raises(ValueError, match="num_flows must be a positive int, got 0"):
        af.build_flow("iaf", 3, num_flows=0)
    with pytest.raises(ValueError, match="input_dim must be a positive int, got -2"):
        af.build_flow("iaf", -2)
    with pytest.raises(ValueError, match="orderings must be 'reversed' or 'random', got 'cyclic'"):
        af.build_flow("iaf", 3, orderings="cyclic")
    with pytest.raises(ValueError, match="non-empty string"):
        af.register_flow("", lambda input_dim: None)
    with pytest.raises(ValueError, match="must be callable"):
        af.register_flow("x", 3)


def test_misconfigured_stacks_fail_at_construction(isolated_registry):
    with pytest.raises(ValueError, match="conditioner is fixed \\(masked\\).*'iaf-lstm'"):
        af.build_flow("iaf", 3, conditioner="lstm")
    with pytest.raises(ValueError, match="no argument 'hidden_dim' \\(did you mean 'hidden_dims'"):
        af.build_flow("maf", 3, hidden_dim=[4])
    with pytest.raises(ValueError, match="gives every layer its own ordering.*orderings="):
        af.build_flow("iaf", 3, ordering="reversed")
    with pytest.raises(ValueError, match="context_dim must be a positive int, got 0"):
        af.build_flow("iaf", 3, context_dim=0)

    af.register_flow("returns-none", lambda input_dim, context_dim=None: None)
    with pytest.raises(ValueError, match="'returns-none' returned NoneType, expected a Transform"):
        af.build_flow("returns-none", 3)
    af.register_flow("returns-module", lambda input_dim, context_dim=None: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="returned Linear, expected a Transform"):
        af.build_flow("returns-module", 3)
    af.register_flow("fixed", lambda input_dim, context_dim=None: af.iaf(input_dim))
    with pytest.raises(ValueError, match="flow 'fixed' takes no argument 'hidden_dims'"):
        af.build_flow("fixed", 3, hidden_dims=[4])
