"""The conditioner contract: forward and recur agree, orders are respected, costs are O(D)."""

from __future__ import annotations

import pytest
import torch

from conftest import CONTEXT_DIM, DEVICE, SMALL_NET, perturb
from pyro_arflow.conditioners import (
    ConvConditioner,
    LSTMConditioner,
    MaskedConditioner,
    MaskedLinear,
    lstm,
    make_conditioner,
)
from pyro_arflow.ordering import resolve_ordering


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
        ("conv", {"channels": 4, "num_layers": 2}),  # receptive field 4 < 6 positions
        ("conv", {"channels": 4, "kernel_size": 3, "ordering": "random", "seed": 2}),
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
        rank = conditioner.inverse_ordering
        not_before = rank[None, :] >= rank[:, None]
        reach = torch.zeros(5, 5, dtype=torch.float64)
        for u in torch.randn(8, 5, dtype=torch.float64):
            jac_loc, jac_raw = torch.autograd.functional.jacobian(conditioner, u)
            assert torch.all(jac_loc[not_before] == 0) and torch.all(jac_raw[not_before] == 0)
            reach += jac_loc.abs() + jac_raw.abs()
        assert torch.all(reach[~not_before] > 0)  # every earlier position is read


@pytest.mark.parametrize("kernel_size, num_layers", [(2, 2), (3, 2), (2, 3)])
def test_conv_reads_exactly_its_receptive_field_before_each_position(kernel_size, num_layers):
    """Output t depends on the R positions before it in the ordering, and on no other: a
    Jacobian triangular in the ordering, banded by the receptive field."""
    dim, ordering = 12, torch.randperm(12, generator=torch.Generator().manual_seed(3))
    conditioner = ConvConditioner(dim, 4, kernel_size, num_layers, ordering=ordering)
    perturb(conditioner.double())
    receptive = conditioner.receptive_field
    assert receptive == 1 + (kernel_size - 1) * (2**num_layers - 1)
    step = conditioner.inverse_ordering
    lag = step[:, None] - step[None, :]  # lag[i, j]: how many steps j comes before i
    read = (lag >= 1) & (lag <= receptive)
    reach = torch.zeros(dim, dim, dtype=torch.float64)
    for u in torch.randn(6, dim, dtype=torch.float64):
        jac_loc, jac_raw = torch.autograd.functional.jacobian(conditioner, u)
        assert torch.all(jac_loc[~read] == 0) and torch.all(jac_raw[~read] == 0)
        reach += jac_loc.abs() + jac_raw.abs()
    assert torch.all(reach[read] > 0)


def test_conv_solve_is_the_d_pass_fixed_point_and_its_size_does_not_grow():
    """The incremental solve, which reads only each step's receptive field, equals the
    textbook fixed point of D full passes; the parameters are the same at any D."""
    conditioner = perturb(ConvConditioner(40, 6, context_dim=CONTEXT_DIM)).double()
    w = torch.randn(3, 40, dtype=torch.float64)
    context = torch.randn(3, CONTEXT_DIM, dtype=torch.float64)
    u = w
    for _ in range(40):
        u = push(*conditioner(u, context), w)
    solved, _, _ = conditioner.recur(w, push, context)
    torch.testing.assert_close(solved, u, atol=1e-12, rtol=0)
    counts = {
        dim: sum(p.numel() for p in ConvConditioner(dim, 6, context_dim=2).parameters())
        for dim in (10, 1000, 100_000)
    }
    assert len(set(counts.values())) == 1, counts


def test_lstm_runs_each_step_once_forward_and_one_cell_step_per_position_recurring(monkeypatch):
    dim, layers = 150, 2
    conditioner = perturb(LSTMConditioner(dim, hidden_size=8, num_layers=layers))
    calls = []
    conditioner.lstm.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    conditioner(torch.randn(4, dim))
    assert calls == [dim]  # the gate buffers fit the budget: one call over the sequence
    calls.clear()
    monkeypatch.setattr(lstm, "FORWARD_GATE_BUDGET", 64 * 4 * 4 * 8)  # 64 steps of batch 4
    conditioner(torch.randn(4, dim))
    assert calls == [64, 64, dim - 128]  # windows, no step run twice
    calls.clear()
    cell_steps = []
    lstm_cell = torch.lstm_cell
    monkeypatch.setattr(torch, "lstm_cell", lambda *args: cell_steps.append(1) or lstm_cell(*args))
    conditioner.recur(torch.randn(4, dim), push)
    assert calls == []  # no prefix re-runs of the sequence model
    assert len(cell_steps) == dim * layers  # one fused cell call per layer and position


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_forward_in_windows_equals_one_call_over_the_sequence(num_layers, monkeypatch):
    monkeypatch.setattr(lstm, "FORWARD_GATE_BUDGET", 10 * 3 * 4 * 8)  # windows of 10 steps
    dim = 37
    conditioner = perturb(
        LSTMConditioner(dim, hidden_size=8, num_layers=num_layers, context_dim=CONTEXT_DIM)
    ).double()
    u = torch.randn(3, dim, dtype=torch.float64)
    context = torch.randn(3, CONTEXT_DIM, dtype=torch.float64)
    loc, raw = conditioner(u, context)
    # the whole shifted sequence through nn.LSTM at once, then the head, in position order
    shifted = torch.cat([conditioner.start_value.expand(1, 3), u.t()[:-1]])
    steps = conditioner._steps_input(shifted, context)
    hidden, _ = conditioner.lstm(steps, conditioner._start_state(3))
    expected = (conditioner.head(hidden) + conditioner.position_bias).permute(1, 2, 0)
    torch.testing.assert_close(loc, expected[:, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(raw, expected[:, 1], atol=1e-12, rtol=0)


def test_lstm_first_position_reads_the_learned_start():
    conditioner = perturb(LSTMConditioner(1, hidden_size=4))
    loc, raw = conditioner(torch.randn(3, 1))
    assert torch.all(loc == loc[0]) and loc.abs().sum() > 0  # same for all inputs, learned


def test_masked_linear_is_a_masked_affine_map_in_one_parameter():
    torch.manual_seed(0)
    mask = (torch.rand(5, 4) > 0.5).double()
    layer = MaskedLinear(4, 5).double()
    layer.set_mask(mask)
    assert [name for name, _ in layer.named_parameters()] == ["affine"]
    assert layer.weight.shape == (5, 4) and layer.bias.shape == (5,)
    assert layer.weight.data_ptr() == layer.affine.data_ptr()  # views, not copies
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = x @ (layer.weight * mask).t() + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-14, rtol=0)
    (layer(x) ** 2).sum().backward()
    weight_grad = layer.affine.grad[:-1].t()
    assert torch.all(weight_grad[mask == 0] == 0)  # masked weights never move
    assert torch.all(weight_grad[mask == 1] != 0) and torch.all(layer.affine.grad[-1] != 0)
    bound = 4**-0.5  # nn.Linear's initialization
    assert 0 < layer.affine.abs().max() <= bound


def test_masked_conditioner_registers_one_tensor_per_layer():
    conditioner = MaskedConditioner(4, [8, 8], context_dim=2)
    names = [name for name, _ in conditioner.named_parameters()]
    assert names == ["hidden.0.affine", "hidden.1.affine", "output.affine"]


@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.ELU, torch.nn.SiLU])
def test_activation_classes_run_in_place_with_the_same_values_and_gradients(activation):
    in_place = perturb(MaskedConditioner(5, [16, 16], activation=activation).double())
    assert in_place.activation.inplace
    out_of_place = MaskedConditioner(5, [16, 16], activation=activation()).double()
    out_of_place.load_state_dict(in_place.state_dict())
    assert not out_of_place.activation.inplace
    u = torch.randn(7, 5, dtype=torch.float64)
    outputs = []
    for conditioner in (in_place, out_of_place):
        loc, raw = conditioner(u)
        (loc.square().sum() + raw.sin().sum()).backward()
        outputs.append([loc, raw] + [p.grad for p in conditioner.parameters()])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_orderings():
    assert resolve_ordering(4, "natural").tolist() == [0, 1, 2, 3]
    assert resolve_ordering(4, "reversed").tolist() == [3, 2, 1, 0]
    first, second = resolve_ordering(9, "random", seed=1), resolve_ordering(9, "random", seed=2)
    assert torch.equal(first, resolve_ordering(9, "random", seed=1))
    assert not torch.equal(first, second)
    with pytest.raises(ValueError, match=r"permutation of range\(3\), got \[0, 0, 2\]"):
        resolve_ordering(3, [0, 0, 2])
    with pytest.raises(ValueError, match="unknown ordering 'sorted'"):
        resolve_ordering(3, "sorted")


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="equal hidden widths"):
        MaskedConditioner(3, [4, 8], residual=True)
    with pytest.raises(ValueError, match=r"hidden_dims \(\[0\]\) must be a positive int, got 0"):
        MaskedConditioner(3, [0])
    with pytest.raises(ValueError, match="input_dim must be a positive int, got 0"):
        LSTMConditioner(0)
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMConditioner(3, hidden_size=0)
    with pytest.raises(ValueError, match="context_dim"):
        MaskedConditioner(3, context_dim=-1)


def structural_reach(conditioner: MaskedConditioner) -> torch.Tensor:
    """(D, D) booleans: whether some path of kept connections leads from input j to loc_i."""
    dim = conditioner.input_dim
    reach = torch.eye(dim)
    for index, layer in enumerate(conditioner.hidden):
        step = (layer.mask_t[:dim] if index == 0 else layer.mask_t).t().ne(0).float() @ reach
        if conditioner.residual and index > 0:
            step = step + reach  # the residual path
        reach = step.clamp(max=1)
    if conditioner.skip_connections:
        reach = torch.cat([reach, torch.eye(dim)])  # the output also reads the input
    return (conditioner.output.mask_t.t().ne(0).float() @ reach)[:dim] > 0


@pytest.mark.parametrize("dim", [1, 2, 5, 13])
@pytest.mark.parametrize("ordering", ["natural", "reversed", "random"])
@pytest.mark.parametrize(
    "hidden", ["none", "D-1", "D-1,D-1", "default", "2D,D-1", "residual"], ids=str
)
@pytest.mark.parametrize("skip", [False, True], ids=["hidden-only", "skip"])
def test_every_accepted_made_keeps_every_dependency(dim, ordering, hidden, skip):
    """Without skip connections the hidden path alone must carry every dependency; with them
    the skip path must add none that is not allowed."""
    narrowest = max(dim - 1, 1)
    widths = {
        "none": [],
        "D-1": [narrowest],
        "D-1,D-1": [narrowest, narrowest],
        "default": None,
        "2D,D-1": [2 * dim, narrowest],
        "residual": [dim + 3] * 3,
    }[hidden]
    conditioner = MaskedConditioner(
        dim,
        widths,
        ordering=ordering,
        seed=dim,
        residual=hidden == "residual",
        skip_connections=skip,
    )
    rank = conditioner.inverse_ordering
    allowed = rank[None, :] < rank[:, None]  # loc_i may read x_j
    reach = structural_reach(conditioner)
    assert torch.equal(reach, allowed)
    assert int(reach.sum()) == dim * (dim - 1) // 2


def test_made_layers_narrower_than_d_minus_1_are_rejected():
    with pytest.raises(ValueError, match=r"at least input_dim - 1 = 9 units.*\[5\]"):
        MaskedConditioner(10, [5])
    with pytest.raises(ValueError, match=r"at least input_dim - 1 = 99 .*\[64, 64\]"):
        make_conditioner("masked", 100, hidden_dims=[64, 64])
    with pytest.raises(ValueError, match="hidden_dims must be a list of ints, got 16"):
        MaskedConditioner(3, 16)


def test_orderings_and_sizes_are_not_coerced():
    with pytest.raises(ValueError, match="1-D sequence of integers.*float"):
        resolve_ordering(4, [0.0, 1.5, 2, 3])
    with pytest.raises(ValueError, match="1-D sequence of integers, got 2-D"):
        resolve_ordering(4, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="1-D sequence of integers.*bool"):
        resolve_ordering(2, [True, False])
    with pytest.raises(ValueError, match="input_dim must be a positive int, got True"):
        MaskedConditioner(True)
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 8.0"):
        LSTMConditioner(3, hidden_size=8.0)
    assert resolve_ordering(3, torch.tensor([2, 0, 1], dtype=torch.int32)).tolist() == [2, 0, 1]


def test_unknown_keywords_and_activations_fail_at_construction():
    with pytest.raises(
        ValueError, match="takes no argument 'hidden_dim' \\(did you mean 'hidden_dims'"
    ):
        make_conditioner("masked", 10, hidden_dim=[5])
    with pytest.raises(ValueError, match="lstm conditioner takes no argument 'hidden_dims'"):
        make_conditioner("lstm", 10, hidden_dims=[5])
    with pytest.raises(ValueError, match="activation must be an elementwise nn.Module.*'relu'"):
        MaskedConditioner(3, activation="relu")


def test_state_dict_holds_parameters_and_the_ordering_only():
    conditioner = MaskedConditioner(50)  # default width 151
    state = conditioner.state_dict()
    assert sorted(state) == ["hidden.0.affine", "ordering", "output.affine"]
    parameter_bytes = sum(p.numel() * p.element_size() for p in conditioner.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert state_bytes == parameter_bytes + 50 * 8  # plus the int64 ordering


@pytest.mark.parametrize("name", ["masked", "lstm"])
def test_a_state_dict_of_version_0_3_loads_with_its_ordering(name):
    """0.3 saved the ordering under the key ``order``; such a checkpoint still loads, and the
    masks follow it: the loaded network computes what the saved one did."""
    saved = perturb(make_conditioner(name, 5, ordering="random", seed=3, **SMALL_NET[name]))
    state = {key.replace("ordering", "order"): value for key, value in saved.state_dict().items()}
    assert "order" in state
    loaded = make_conditioner(name, 5, **SMALL_NET[name])
    loaded.load_state_dict(state)
    assert torch.equal(loaded.ordering, saved.ordering)
    assert torch.equal(loaded.inverse_ordering, torch.argsort(saved.ordering))
    u = torch.randn(4, 5, device=DEVICE)
    for mine, theirs in zip(loaded(u), saved(u), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("name", ["masked", "lstm"])
def test_inputs_of_another_dtype_or_with_a_stray_context_raise(name):
    conditioner = make_conditioner(name, 4, context_dim=2)
    with pytest.raises(
        ValueError, match="torch.float64 but the network's parameters have .*float32"
    ):
        conditioner(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2))
    with pytest.raises(ValueError, match="context has dtype torch.int64"):
        conditioner(torch.randn(3, 4), torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"context's batch shape \(5,\) does not broadcast.*\(3,\)"
    ):
        conditioner(torch.randn(3, 4), torch.randn(5, 2))
    loc, raw = conditioner(torch.randn(0, 4), torch.randn(0, 2))
    assert loc.shape == raw.shape == (0, 4)
    u, loc, raw = conditioner.recur(torch.randn(2, 0, 4), push, torch.randn(2))
    assert u.shape == loc.shape == raw.shape == (2, 0, 4)


def test_masked_weights_kept_without_autograd_follow_every_update():
    layer = MaskedLinear(4, 3)
    layer.set_mask((torch.rand(3, 4) > 0.5).float())
    x = torch.randn(5, 4)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, layer(x.clone()), atol=0, rtol=0)
        assert layer._masked_weight is not None  # kept for the next call
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # with autograd: the product is taken afresh
    optimizer.step()  # an in-place update
    with torch.no_grad():
        expected = x @ (layer.weight * (layer.mask_t.t() != 0)).t() + layer.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
        layer.affine.copy_(torch.randn_like(layer.affine))  # as load_state_dict does
        expected = x @ (layer.weight * (layer.mask_t.t() != 0)).t() + layer.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_output_gain_default_and_override():
    assert MaskedConditioner(4, [64]).output.gain == 0.125  # 8 / 64
    assert MaskedConditioner(4, [6]).output.gain == 1.0  # small layers keep gain 1
    assert MaskedConditioner(500).output.gain == 2.0**-8  # 8 / 1501, rounded to a power of 2
    plain = perturb(MaskedConditioner(4, [16], output_gain=1.0, skip_connections=True).double())
    u = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        features = torch.cat([plain.activation(plain.hidden[0](u)), u], -1)  # hidden + skip
        loc = features @ (plain.output.weight[:4] * (plain.output.mask_t.t()[:4] != 0)).t()
    torch.testing.assert_close(plain(u)[0], loc + plain.output.bias[:4], atol=1e-12, rtol=0)
    for bad in (0.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="output_gain must be a"):
            MaskedConditioner(4, output_gain=bad)
