r"""Sticking the landing: a guide's density read with its parameters held fixed.

Roeder, Wu and Duvenaud 2017, "Sticking the Landing: Simple, Lower-Variance Gradient
Estimators for Variational Inference", https://arxiv.org/abs/1703.09194. The reparameterized
ELBO gradient of a draw :math:`z = T_\phi(\epsilon)` is

.. math::

    \nabla_\phi \left[\log p(x, z) - \log q_\phi(z)\right]
    = \underbrace{\left(\nabla_z \log p(x, z) - \nabla_z \log q_\phi(z)\right)
      \frac{\partial z}{\partial \phi}}_{\text{path}}
      - \underbrace{\nabla_\phi \log q_\phi(z)\big|_{z}}_{\text{score}} .

The score term has expectation zero but not variance zero; the path term vanishes draw by
draw when :math:`q_\phi` is the posterior (then :math:`\log p(x, z) - \log q_\phi(z)` is
constant in :math:`z`). Dropping the score term keeps the expectation and makes the estimator's
variance vanish at the exact posterior. It is dropped by reading :math:`\log q` at the drawn
:math:`z` with :math:`\phi` detached, so that gradients reach it only through :math:`z`.

That reading scores a given value, which for an IAF is the sequential direction: cheap for the
few globals of a prior-structured guide, dear for a flat IAF over thousands of latents.
:class:`~pyro_arflow.AutoARFlow` applies it to the part its flow draws (every latent of a flat
guide, the globals of one with paths); a path keeps the standard estimator, whose terms stay
bounded where a path's scale is small, while the held-fixed path density's gradient in the
path, :math:`(x - \mu) / \sigma^2`, leaves float32's range in a funnel's neck.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from pyro.distributions import TorchDistribution
from torch import Size, Tensor, nn
from torch.distributions import constraints

__all__ = ["StickingTheLanding", "detached_parameters"]


@contextmanager
def detached_parameters(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, every parameter of ``modules`` reads as its ``detach()``: the same
    values, no gradient. Restored on exit, whatever happens.

    Example::

        >>> import torch
        >>> from pyro_arflow.landing import detached_parameters
        >>> layer = torch.nn.Linear(2, 1)
        >>> with detached_parameters([layer]):
        ...     layer(torch.ones(2)).requires_grad
        False
        >>> layer(torch.ones(2)).requires_grad
        True
    """
    swapped = []
    for module in {id(m): m for root in modules for m in root.modules()}.values():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                swapped.append((module, name, parameter))
                module._parameters[name] = parameter.detach()
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


class StickingTheLanding(TorchDistribution):
    """A guide's posterior whose draws are its own and whose ``log_prob`` is
    ``log_density``: the same density, read with the guide's parameters detached.

    Arguments:
        posterior: the guide's distribution (reparameterized).
        log_density: ``value -> log q(value)`` with the parameters held fixed.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_arflow.landing import StickingTheLanding
        >>> loc = torch.zeros(2, requires_grad=True)  # q = N(loc, I) is the posterior N(0, I)
        >>> q = StickingTheLanding(
        ...     dist.Normal(loc, 1.0).to_event(1),
        ...     lambda z: dist.Normal(loc.detach(), 1.0).to_event(1).log_prob(z),
        ... )
        >>> z = q.rsample()
        >>> elbo = dist.Normal(torch.zeros(2), 1.0).to_event(1).log_prob(z) - q.log_prob(z)
        >>> torch.autograd.grad(elbo, loc)[0]  # zero at every draw
        tensor([0., 0.])
    """

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(
        self, posterior: TorchDistribution, log_density: Callable[[Tensor], Tensor]
    ) -> None:
        self.posterior = posterior
        self.log_density = log_density
        super().__init__(posterior.batch_shape, posterior.event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.posterior.support

    def rsample(self, sample_shape: Size = Size()) -> Tensor:
        return self.posterior.rsample(sample_shape)

    def sample(self, sample_shape: Size = Size()) -> Tensor:
        with torch.no_grad():
            return self.posterior.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.log_density(value)
