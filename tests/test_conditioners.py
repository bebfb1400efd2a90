"""The conditioner contract: forward and recur agree, orders are respected, costs are O(D)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONTEXT_DIM, perturb

from pyro_arflow.conditioners import LSTMConditioner, MaskedConditioner, make_conditioner
from pyro_arflow.conditioners.base import resolve_order


def push(loc, raw, z):
    return loc + torch.nn.functional.softplus(raw) * z


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("masked", {"hidden_dims": [16, 16]}),
        ("masked", {"hidden_dims": [16, 16, 16], "residual": True}),
        ("masked", {"hidden_dims": []}),
        ("masked", {"hidden_dims": [8], "ordering": "random", "seed": 4}),
        ("lstm", {"hidden_size": 8}),
        ("lstm", {"hidden_size": 8, "num_layers": 2, "ordering": "reversed"}),
    ],
)
def test_recur_solves_what_forward_reads(name, kwargs, conditional):
    dim = 6
    conditioner = perturb(
        make_conditioner(name, dim, CONTEXT_DIM if conditional else None, **kwargs)
    )
    conditioner.double()
    context = torch.randn(5, CONTEXT_DIM, dtype=torch.float64) if conditional else None
    w = torch.randn(5, dim, dtype=torch.float64)
    u, loc, raw = conditioner.recur(w, push, context)
    forward_loc, forward_raw = conditioner(u, context)
    torch.testing.assert_close(loc, forward_loc, atol=1e-12, rtol=0)
    torch.testing.assert_close(raw, forward_raw, atol=1e-12, rtol=0)
    torch.testing.assert_close(u, push(loc, raw, w), atol=1e-12, rtol=0)


def test_outputs_depend_only_on_earlier_positions():
    order = [3, 1, 4, 0, 2]
    for conditioner in (
        MaskedConditioner(5, [12], ordering=order),
        LSTMConditioner(5, 6, ordering=order),
    ):
        perturb(conditioner.double())
        rank = conditioner.rank
        not_before = rank[None, :] >= rank[:, None]
        reach = torch.zeros(5, 5, dtype=torch.float64)
        for u in torch.randn(8, 5, dtype=torch.float64):
            jac_loc, jac_raw = torch.autograd.functional.jacobian(conditioner, u)
            assert torch.all(jac_loc[not_before] == 0) and torch.all(jac_raw[not_before] == 0)
            reach += jac_loc.abs() + jac_raw.abs()
        assert torch.all(reach[~not_before] > 0)  # every earlier position is read


def test_lstm_runs_once_forward_and_one_cell_step_per_position_recurring(monkeypatch):
    dim, layers = 50, 2
    conditioner = perturb(LSTMConditioner(dim, hidden_size=8, num_layers=layers))
    calls = []
    conditioner.lstm.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    conditioner(torch.randn(4, dim))
    assert calls == [dim]  # one call over the whole shifted sequence
    calls.clear()
    cell_steps = []
    lstm_cell = torch.lstm_cell
    monkeypatch.setattr(torch, "lstm_cell", lambda *args: cell_steps.append(1) or lstm_cell(*args))
    conditioner.recur(torch.randn(4, dim), push)
    assert calls == []  # no prefix re-runs of the sequence model
    assert len(cell_steps) == dim * layers  # one fused cell call per layer and position


def test_lstm_first_position_reads_the_learned_start():
    conditioner = perturb(LSTMConditioner(1, hidden_size=4))
    loc, raw = conditioner(torch.randn(3, 1))
    assert torch.all(loc == loc[0]) and loc.abs().sum() > 0  # same for all inputs, learned


def test_orderings():
    assert resolve_order(4, "natural").tolist() == [0, 1, 2, 3]
    assert resolve_order(4, "reversed").tolist() == [3, 2, 1, 0]
    assert torch.equal(resolve_order(9, "random", seed=1), resolve_order(9, "random", seed=1))
    assert not torch.equal(resolve_order(9, "random", seed=1), resolve_order(9, "random", seed=2))
    with pytest.raises(ValueError, match=r"permutation of range\(3\), got \[0, 0, 2\]"):
        resolve_order(3, [0, 0, 2])
    with pytest.raises(ValueError, match="unknown ordering 'sorted'"):
        resolve_order(3, "sorted")


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="equal hidden widths"):
        MaskedConditioner(3, [4, 8], residual=True)
    with pytest.raises(ValueError, match="hidden_dims must be positive ints"):
        MaskedConditioner(3, [0])
    with pytest.raises(ValueError, match="input_dim must be a positive int, got 0"):
        LSTMConditioner(0)
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMConditioner(3, hidden_size=0)
    with pytest.raises(ValueError, match="context_dim"):
        MaskedConditioner(3, context_dim=-1)
