"""Scale maps: identity at zero, their inverses, and safety for large |raw|."""

from __future__ import annotations

import pytest
import torch

from pyro_arflow.scales import (
    SCALE_MAPS,
    SigmoidScale,
    SoftClipExpScale,
    SoftplusScale,
    make_scale_map,
)


@pytest.mark.parametrize("name", sorted(SCALE_MAPS))
def test_zero_maps_to_unit_scale_and_log_scale_is_its_log(name):
    transform = make_scale_map(name)
    scale, log_scale = transform(torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(scale, torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    raw = torch.linspace(-8, 8, 101, dtype=torch.float64)
    scale, log_scale = transform(raw)
    torch.testing.assert_close(log_scale, scale.log())
    assert torch.all(scale[1:] > scale[:-1])  # increasing
    torch.testing.assert_close(transform.raw_for(scale), raw, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", sorted(SCALE_MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_raw_values_stay_finite_and_positive(name, dtype):
    raw = torch.tensor([-1e30, -1e4, -100.0, 100.0, 1e4, 1e30], dtype=dtype, requires_grad=True)
    scale, log_scale = make_scale_map(name)(raw)
    assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
    assert torch.all(torch.isfinite(log_scale))
    (scale.sum() + log_scale.sum()).backward()
    assert torch.all(torch.isfinite(raw.grad))


def test_bounds_hold():
    raw = torch.linspace(-50, 50, 201)
    assert SoftplusScale(min_scale=0.01)(raw)[0].min() >= 0.01
    log_scale = SoftClipExpScale(bound=2.0)(raw)[1]
    assert log_scale.abs().max() <= 2.0
    scale = SigmoidScale(0.1, 3.0)(raw)[0]
    assert scale.min() >= 0.1 and scale.max() <= 3.0


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown scale map 'tanh'.*exp.*sigmoid.*softplus"):
        make_scale_map("tanh")
    with pytest.raises(ValueError, match=r"min_scale must lie in \(0, 1\), got 2"):
        SoftplusScale(min_scale=2)
    with pytest.raises(ValueError, match="bound must be > 0"):
        SoftClipExpScale(bound=0.0)
    with pytest.raises(ValueError, match="min_scale < 1 < max_scale"):
        SigmoidScale(0.5, 0.9)
