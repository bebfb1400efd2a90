"""Shared builders: layers of every kind, moved away from the identity."""

from __future__ import annotations

import os

import pyro
import pytest
import torch
from torch import Tensor, nn

import pyro_arflow as af
from pyro_arflow import validation

if os.environ.get("PYRO_ARFLOW_TEST_DEVICE"):  # e.g. cuda: the whole suite on that device
    torch.set_default_device(os.environ["PYRO_ARFLOW_TEST_DEVICE"])
DEVICE = torch.empty(0).device

CONTEXT_DIM = 3
LAYER_KINDS = ["iaf", "maf"]
CONDITIONERS = ["masked", "lstm"]
SMALL_NET = {"masked": {"hidden_dims": [16, 16]}, "lstm": {"hidden_size": 8}}


@pytest.fixture
def float64():
    """Exact comparisons (Jacobians, densities) in double precision, for the test's duration."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def perturb(module: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Move every parameter away from its (identity) initialization, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(
                parameter.shape, generator=generator, dtype=torch.float64, device="cpu"
            )
            parameter.add_(std * noise.to(parameter))
    return module


def make_layer(
    kind: str,
    conditioner: str,
    input_dim: int,
    conditional: bool = False,
    dtype: torch.dtype = torch.float32,
    batch_shape: tuple[int, ...] = (),
    seed: int = 0,
    **kwargs,
) -> tuple[nn.Module, torch.distributions.Transform, Tensor | None]:
    """(trainable module, the transform to apply, its context) for one layer kind."""
    kwargs = {**SMALL_NET[conditioner], **kwargs}
    if conditional:
        helper = af.conditional_iaf if kind == "iaf" else af.conditional_maf
        module = helper(input_dim, CONTEXT_DIM, conditioner=conditioner, **kwargs)
    else:
        helper = af.iaf if kind == "iaf" else af.maf
        module = helper(input_dim, conditioner=conditioner, **kwargs)
    perturb(module.to(dtype), seed=seed)
    if not conditional:
        return module, module, None
    generator = torch.Generator().manual_seed(seed + 1)
    context = torch.randn(
        batch_shape + (CONTEXT_DIM,), generator=generator, dtype=dtype, device="cpu"
    )
    context = context.to(DEVICE)
    return module, module.condition(context), context


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
    validation._DEFERRED.clear()  # a GPU test's deferred checks never reach the next test
