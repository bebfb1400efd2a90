"""LinearAutoregression: y = (I - B)^{-1} x, exact in both directions, volume preserving, the
Gaussian autoregression it claims to be; and its place in the "iaf" flow."""

from __future__ import annotations

import copy
import io
import pickle

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from torch.autograd.functional import jacobian

import pyro_arflow as af
from conftest import CONTEXT_DIM, DEVICE

DIM = 5


def trained_layer(ordering="random", seed: int = 3) -> af.LinearAutoregression:
    layer = af.linear_autoregression(DIM, ordering, seed=seed).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(0.5 * torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    return layer


def precision_of(layer: af.LinearAutoregression) -> torch.Tensor:
    """The precision of y = (I - B)^{-1} z, z ~ N(0, I), in the input's coordinates."""
    in_order = torch.eye(DIM, dtype=torch.float64) - layer.weight.detach().cpu().tril(-1)
    unit = torch.zeros(DIM, DIM, dtype=torch.float64)
    unit[torch.arange(DIM), layer.ordering.cpu()] = 1.0  # rows: order position -> coordinate
    factor = in_order @ unit
    return factor.T @ factor


@pytest.mark.parametrize("ordering", ["natural", "reversed", "random"])
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3), (0,)], ids=str)
def test_inverse_of_forward_is_the_identity(ordering, batch_shape):
    layer = trained_layer(ordering)
    x = torch.randn(batch_shape + (DIM,), dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(layer.inv(y.clone()), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(layer.inv(y.clone())), y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("ordering", ["natural", "reversed", "random"])
def test_jacobian_is_unit_triangular_in_the_order(ordering):
    layer = trained_layer(ordering)
    x = torch.randn(DIM, dtype=torch.float64)
    matrix = jacobian(layer, x)
    in_order = matrix[layer.ordering][:, layer.ordering]
    torch.testing.assert_close(in_order.triu(1), torch.zeros(DIM, DIM, dtype=torch.float64))
    torch.testing.assert_close(in_order.diagonal(), torch.ones(DIM, dtype=torch.float64))
    assert in_order.tril(-1).abs().sum() > 0.1  # it does mix
    log_det = layer.log_abs_det_jacobian(x, layer(x))
    torch.testing.assert_close(log_det, torch.linalg.slogdet(matrix).logabsdet)


def test_pushforward_of_a_standard_normal_is_the_gaussian_autoregression():
    layer = trained_layer()
    base = dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.0).to_event(1)
    flow = dist.TransformedDistribution(base, [layer])
    gaussian = dist.MultivariateNormal(
        torch.zeros(DIM, dtype=torch.float64), precision_matrix=precision_of(layer)
    )
    y = torch.randn(7, DIM, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(y), gaussian.log_prob(y), atol=1e-10, rtol=0)


def test_only_the_strict_lower_triangle_is_read_or_trained():
    layer = trained_layer("natural")
    x = torch.randn(3, DIM, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(torch.eye(DIM).triu().double())  # diagonal and upper: unread
    torch.testing.assert_close(layer(x.clone()), before)
    layer(x.clone()).square().sum().backward()
    assert layer.weight.grad.triu().abs().sum() == 0
    assert layer.weight.grad.tril(-1).abs().sum() > 0


def test_state_dict_pickle_deepcopy_and_with_cache_round_trip():
    layer = trained_layer()
    x = torch.randn(3, DIM, dtype=torch.float64)
    fresh = af.LinearAutoregression(DIM).double()
    fresh.load_state_dict(layer.state_dict())  # the order travels with the weights
    torch.testing.assert_close(fresh(x), layer(x))
    buffer = io.BytesIO()
    pickle.dump(layer, buffer)
    torch.testing.assert_close(pickle.loads(buffer.getvalue())(x.clone()), layer(x))
    torch.testing.assert_close(copy.deepcopy(layer)(x.clone()), layer(x))
    uncached = layer.with_cache(0)
    assert uncached.weight is layer.weight
    torch.testing.assert_close(uncached(x.clone()), layer(x))


def test_bad_input_raises_value_error():
    layer = trained_layer()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 5\), got shape \(3, 4\)"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(3, DIM))
    with pytest.raises(ValueError, match="permutation"):
        af.linear_autoregression(3, [0, 0, 1])


def test_the_iaf_flow_follows_each_layer_with_one_in_the_same_order():
    flow = af.build_flow("iaf", DIM, num_flows=2, hidden_dims=[8])
    layers = [part for block in flow.parts for part in block.parts]
    kinds = [type(part).__name__ for part in layers]
    assert kinds == ["IAF", "LinearAutoregression"] * 2
    assert torch.equal(layers[0].conditioner.ordering, layers[1].ordering)
    assert torch.equal(layers[2].conditioner.ordering, layers[3].ordering)
    plain = af.build_flow("iaf", DIM, hidden_dims=[8], linear_autoregression=False)
    assert [type(part).__name__ for part in plain.parts] == ["IAF", "IAF"]
    lstm = af.build_flow("iaf-lstm", DIM, hidden_size=4)
    assert [type(part).__name__ for part in lstm.parts] == ["IAF", "IAF"]


def test_the_conditional_iaf_flow_keeps_its_linear_layers_and_inverts():
    flow = af.build_flow("iaf", DIM, context_dim=CONTEXT_DIM, hidden_dims=[8]).to(DEVICE)
    assert isinstance(flow, ConditionalComposeTransformModule)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    context = torch.randn(4, CONTEXT_DIM)
    bound = flow.condition(context)
    x = torch.randn(4, DIM)
    torch.testing.assert_close(bound.inv(bound(x).clone()), x, atol=1e-4, rtol=0)


def as_dense(banded: af.LinearAutoregression) -> af.LinearAutoregression:
    """The dense layer with the same B: banded ``weight[i, j]`` is ``B[i, i - (k - j)]``."""
    dim, k = banded.input_dim, banded.bandwidth
    dense = af.linear_autoregression(dim, banded.ordering).double()
    with torch.no_grad():
        dense.weight.zero_()
        for i in range(dim):
            for j in range(k):
                if i - (k - j) >= 0:
                    dense.weight[i, i - (k - j)] = banded.weight[i, j]
    return dense


@pytest.mark.parametrize(
    "dim, bandwidth", [(1, 1), (5, 1), (5, 2), (64, 3), (150, 2), (200, 70)], ids=str
)
def test_a_banded_layer_is_the_dense_layer_with_a_banded_b(dim, bandwidth):
    """Both directions agree with the dense layer's (whose are one triangular solve and one
    product) across block boundaries (blocks of 64, or of k when k is larger); the inverse's
    Jacobian, I - B, is unit triangular in the ordering, with only the band below the
    diagonal, and the forward one is its inverse."""
    layer = af.LinearAutoregression(dim, ordering="random", seed=2, bandwidth=bandwidth).double()
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(dim))
    assert layer.weight.shape == (dim, bandwidth)  # O(Dk) parameters
    dense = as_dense(layer)
    x = torch.randn(3, dim, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.inv(x), dense.inv(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.inv(layer(x)), x, atol=1e-10, rtol=0)
    if dim <= 64:
        inverse = jacobian(layer.inv, x[0])[layer.ordering][:, layer.ordering]
        steps = torch.arange(dim)
        lag = steps[:, None] - steps[None, :]
        assert torch.all(inverse[(lag < 0) | (lag > bandwidth)] == 0)
        torch.testing.assert_close(inverse.diagonal(), torch.ones(dim, dtype=torch.float64))
        forward = jacobian(layer, x[0])[layer.ordering][:, layer.ordering]
        torch.testing.assert_close(forward @ inverse, torch.eye(dim, dtype=torch.float64))


def test_a_banded_layer_trains_its_band_and_round_trips():
    layer = af.LinearAutoregression(30, bandwidth=2)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.3)
    x = torch.randn(4, 30)
    (layer(x) * torch.randn(4, 30)).sum().backward()
    gradient = layer.weight.grad.abs()
    assert gradient[2:].min() > 0 and gradient[1, 1] > 0  # every coefficient in the band
    assert gradient[0].sum() == 0 and gradient[1, 0] == 0  # lags before the first position
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.bandwidth == 2
    torch.testing.assert_close(clone(x), layer(x))
    with pytest.raises(ValueError, match="bandwidth must be a positive int, got 0"):
        af.LinearAutoregression(5, bandwidth=0)
