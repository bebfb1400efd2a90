r"""Scale maps: a conditioner's unconstrained output ``raw`` -> ``(scale, log_scale)``.

Every map sends ``raw = 0`` to ``scale = 1``, so a conditioner whose last layer starts at
zero makes its layer start as the identity :math:`y = 0 + 1 \cdot x`. Each map returns
``log_scale`` computed directly (never ``log`` of an underflowed ``scale``) and keeps
``scale`` away from zero and infinity for any finite ``raw``: the sequential direction
divides by it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ScaleMap",
    "SoftplusScale",
    "SoftClipExpScale",
    "SigmoidScale",
    "make_scale_map",
    "SCALE_MAPS",
]


class ScaleMap(nn.Module):
    """A parameter-free, elementwise map ``raw -> (scale, log_scale)`` with ``scale(0) = 1``."""

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def raw_for(self, scale: Tensor) -> Tensor:
        """The ``raw`` value this map sends to ``scale`` (its inverse); used to set weights."""
        raise NotImplementedError


class SoftplusScale(ScaleMap):
    r"""``scale = min_scale + softplus(beta * raw) / beta``, with ``scale(0) = 1``.

    That fixes :math:`\beta = \log 2 / (1 - \text{min\_scale})`. Grows linearly, with slope 1,
    for large ``raw`` (no overflow) and never falls below ``min_scale``. Making ``scale(0) = 1``
    through ``beta``, rather than by shifting ``raw``, keeps the map at three elementwise ops.

    Arguments:
        min_scale: the floor of the scale, > 0 and < 1.
    """

    def __init__(self, min_scale: float = 1e-3) -> None:
        super().__init__()
        if not 0.0 < min_scale < 1.0:
            raise ValueError(f"min_scale must lie in (0, 1), got {min_scale}")
        self.min_scale = min_scale
        self.beta = math.log(2.0) / (1.0 - min_scale)

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        scale = self.min_scale + F.softplus(raw, beta=self.beta)
        return scale, scale.log()

    def raw_for(self, scale: Tensor) -> Tensor:
        excess = torch.as_tensor(scale) - self.min_scale
        return excess + torch.log(-torch.expm1(-self.beta * excess)) / self.beta

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}"


class SoftClipExpScale(ScaleMap):
    r"""``log_scale = bound * tanh(raw / bound)``, ``scale = exp(log_scale)``.

    The exponential map of the IAF/MAF papers, softly clipped to
    :math:`\log \sigma \in (-b, b)` so a large ``raw`` cannot overflow.

    Arguments:
        bound: the largest ``|log_scale|``, > 0.
    """

    def __init__(self, bound: float = 5.0) -> None:
        super().__init__()
        if not bound > 0.0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.bound = bound

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        log_scale = self.bound * torch.tanh(raw / self.bound)
        return log_scale.exp(), log_scale

    def raw_for(self, scale: Tensor) -> Tensor:
        return self.bound * torch.atanh(torch.as_tensor(scale).log() / self.bound)

    def extra_repr(self) -> str:
        return f"bound={self.bound}"


class SigmoidScale(ScaleMap):
    r"""``scale = min_scale + (max_scale - min_scale) * sigmoid(raw + shift)``.

    The gated scale of the IAF paper (Kingma et al. 2016, eq. 14), bounded on both sides,
    with ``shift`` chosen so ``scale(0) = 1``.

    Arguments:
        min_scale: lower bound, in (0, 1).
        max_scale: upper bound, > 1.
    """

    def __init__(self, min_scale: float = 1e-3, max_scale: float = 5.0) -> None:
        super().__init__()
        if not (0.0 < min_scale < 1.0 < max_scale):
            raise ValueError(
                f"need 0 < min_scale < 1 < max_scale, got min_scale={min_scale}, "
                f"max_scale={max_scale}"
            )
        self.min_scale = min_scale
        self.max_scale = max_scale
        fraction = (1.0 - min_scale) / (max_scale - min_scale)
        self.shift = math.log(fraction / (1.0 - fraction))

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        span = self.max_scale - self.min_scale
        scale = self.min_scale + span * torch.sigmoid(raw + self.shift)
        return scale, scale.log()

    def raw_for(self, scale: Tensor) -> Tensor:
        span = self.max_scale - self.min_scale
        return torch.logit((torch.as_tensor(scale) - self.min_scale) / span) - self.shift

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}, max_scale={self.max_scale}"


SCALE_MAPS: dict[str, type[ScaleMap]] = {
    "softplus": SoftplusScale,
    "exp": SoftClipExpScale,
    "sigmoid": SigmoidScale,
}


def make_scale_map(spec: str | ScaleMap = "softplus") -> ScaleMap:
    """The scale map named ``"softplus"``, ``"exp"`` or ``"sigmoid"``; instances pass through."""
    if isinstance(spec, ScaleMap):
        return spec
    if not isinstance(spec, str) or spec not in SCALE_MAPS:
        raise ValueError(f"unknown scale map {spec!r}; expected one of {sorted(SCALE_MAPS)}")
    return SCALE_MAPS[spec]()
