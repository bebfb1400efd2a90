"""The contract every registered flow meets, with every scale map, plain and conditional.

In the style of Pyro's ``_test(factory)`` for its transforms and zuko's parametrized flow
tests: a flow built by ``af.build_flow`` inverts, reports its exact log-determinant, keeps
shapes (empty batches too), follows the dtype rules, and survives pickling and deepcopy after
use (its caches hold non-leaf tensors then).
"""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch

import pyro_arflow as af
from conftest import CONTEXT_DIM, perturb
from pyro_arflow.scales import SCALE_MAPS

DIM = 3
BUILTIN = {"iaf", "maf", "iaf-lstm", "maf-lstm", "iaf-conv", "maf-conv"}
SMALL = {"lstm": {"hidden_size": 4}, "conv": {"channels": 4, "num_layers": 2}}
CASES = [
    (name, scale_map, conditional)
    for name, conditional in itertools.product(af.available_flows(), [False, True])
    for scale_map in (sorted(SCALE_MAPS) if name in BUILTIN else [None])
]


def case_id(case) -> str:
    name, scale_map, conditional = case
    return f"{name}-{scale_map or 'default'}-{'conditional' if conditional else 'plain'}"


def build(case, dtype=torch.float64, batch_shape=(4,)):
    """(trainable module, transform, context): a two-layer flow moved off the identity."""
    name, scale_map, conditional = case
    kwargs = {}
    if name in BUILTIN:
        kwargs = dict(SMALL.get(name.partition("-")[2], {"hidden_dims": [8]}))
        kwargs["scale_map"] = scale_map
    module = af.build_flow(
        name, DIM, num_flows=2, context_dim=CONTEXT_DIM if conditional else None, **kwargs
    )
    perturb(module.to(dtype), std=0.2)
    if not conditional:
        return module, module, None
    context = torch.randn(batch_shape + (CONTEXT_DIM,), dtype=dtype)
    return module, module.condition(context), context


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inverse_and_exact_log_det(case):
    _, transform, _ = build(case)
    x = torch.randn(4, DIM, dtype=torch.float64)
    y = transform(x)
    torch.testing.assert_close(transform.inv(y.clone()), x, atol=1e-10, rtol=0)
    jacobian = torch.autograd.functional.jacobian(lambda v: transform(v).sum(0), x)
    expected = torch.linalg.slogdet(jacobian.permute(1, 0, 2)).logabsdet
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), expected, atol=1e-8, rtol=0)
    fresh = transform.log_abs_det_jacobian(x.clone(), y.clone())
    torch.testing.assert_close(fresh, expected, atol=1e-8, rtol=0)
    assert transform.sign in (-1, 1)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("batch_shape", [(0,), (2, 0), (5,), (2, 3)], ids=str)
def test_shapes_including_empty_batches(case, batch_shape):
    _, transform, _ = build(case, batch_shape=batch_shape)
    x = torch.randn(batch_shape + (DIM,), dtype=torch.float64)
    y = transform(x)
    assert y.shape == x.shape
    assert transform.log_abs_det_jacobian(x, y).shape == batch_shape
    assert transform.inv(y.clone()).shape == x.shape


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dtype_rules(case):
    """A network reads its own dtype only: anything else is a ValueError naming both."""
    _, transform, _ = build(case, dtype=torch.float32)
    for dtype in (torch.float64, torch.float16, torch.int64):
        x = torch.ones(4, DIM, dtype=dtype)
        with pytest.raises(ValueError, match=rf"{dtype}.*torch\.float32"):
            transform(x)
        with pytest.raises(ValueError, match=rf"{dtype}.*torch\.float32"):
            transform.inv(x)
    assert transform(torch.randn(4, DIM)).dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pickle_and_deepcopy_after_use_reproduce_the_flow(case):
    module, transform, context = build(case)
    x = torch.randn(4, DIM, dtype=torch.float64)
    y = transform(x)  # the caches now hold non-leaf tensors
    y.sum().backward()
    for how, other in {
        "deepcopy": copy.deepcopy(module),
        "pickle": pickle.loads(pickle.dumps(module)),
    }.items():
        other_transform = other.condition(context) if context is not None else other
        assert torch.equal(other_transform(x), y), how
        assert torch.equal(other_transform.inv(y.detach().clone()), transform.inv(y.clone())), how
