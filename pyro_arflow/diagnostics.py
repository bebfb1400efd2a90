r"""Diagnostics for a fitted guide: PSIS :math:`\hat k` and ArviZ ``InferenceData``.

:math:`\hat k` (Yao, Vehtari, Simpson and Gelman 2018, "Yes, but Did It Work?: Evaluating
Variational Inference", https://arxiv.org/abs/1802.02538) is the shape of a generalized Pareto
fit to the largest importance ratios :math:`p(x, z) / q(z)`, :math:`z \sim q`:
below 0.5 the guide is good, 0.5 to 0.7 usable, above 0.7 unreliable. The fit is Pyro's
(``pyro.infer.importance.psis_diagnostic``), not a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights
from pyro.poutine.util import site_is_subsample

from ._checks import check_positive_int
from ._model_checks import subsampled_plates

if TYPE_CHECKING:
    import arviz as az

__all__ = ["ImportanceDraws", "importance_resample", "psis_khat", "to_inference_data"]


def psis_khat(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int = 1000,
    max_simultaneous_particles: int | None = None,
    max_plate_nesting: int = 7,
    **kwargs: Any,
) -> float:
    """PSIS :math:`\\hat k` of ``guide`` for ``model``'s posterior given ``*args, **kwargs``.

    Arguments:
        model, guide: a Pyro model and a fitted guide, both vectorizable over a particle plate.
        num_particles: draws from the guide; more gives a steadier estimate (Yao et al. use
            thousands).
        max_simultaneous_particles: draws per vectorized batch (a divisor of
            ``num_particles``); default all at once.
        max_plate_nesting: bound on the plates nested in the model.

    The importance ratios need the whole data: a model whose plate subsamples (a minibatch)
    raises ``ValueError``; call it with arguments that use every data point.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model():
        ...     loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...     pyro.sample("y", dist.Normal(loc, 0.5).to_event(1), obs=torch.tensor([1.0, -1.0]))
        >>> guide = af.AutoARFlow(model, hidden_dims=[4])
        >>> af.fit(model, guide, max_steps=3000, progress=False).converged
        True
        >>> af.psis_khat(model, guide, num_particles=500) < 0.7
        True
    """
    if check_positive_int(num_particles, "num_particles") < 2:
        raise ValueError(f"num_particles must be an int >= 2, got {num_particles!r}")
    _check_full_data(model, "psis_khat", args, kwargs)
    with torch.no_grad():
        khat = psis_diagnostic(
            model,
            guide,
            *args,
            num_particles=num_particles,
            max_simultaneous_particles=max_simultaneous_particles or num_particles,
            max_plate_nesting=max_plate_nesting,
            **kwargs,
        )
    return float(khat)


def _check_full_data(model: Callable, caller: str, args: tuple, kwargs: dict) -> poutine.Trace:
    """A trace of ``model`` (its prior draws); ``ValueError`` if a plate in it subsamples."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    for name, drawn, size in subsampled_plates(trace):
        raise ValueError(
            f"{caller} needs the model on its whole data, but the plate {name!r} draws a "
            f"subsample of {drawn} of its {size} members: the result would be that of one "
            "random minibatch. Call it with arguments that make the plate use every member "
            "(subsample_size=None)"
        )
    return trace


@dataclass
class ImportanceDraws:
    """Draws from a guide, reweighted toward the posterior and resampled.

    Attributes:
        samples: per latent site, ``num_samples`` resampled draws shaped
            ``(num_samples, *site_shape)``.
        khat: the Pareto shape of the weights' tail; the draws can be trusted below 0.7.
        ess: the effective sample size of the smoothed weights (out of ``num_proposals``).
        log_weights: the smoothed, normalized log weights of the proposals.

    Example::

        >>> import torch, pyro_arflow as af
        >>> draws = af.ImportanceDraws({"x": torch.zeros(3, 2)}, 0.4, 812.0, torch.zeros(10))
        >>> draws.samples["x"].shape, draws.khat < 0.7
        (torch.Size([3, 2]), True)
    """

    samples: dict[str, torch.Tensor]
    khat: float
    ess: float
    log_weights: torch.Tensor


def importance_resample(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    num_proposals: int | None = None,
    **kwargs: Any,
) -> ImportanceDraws:
    r"""Posterior draws by Pareto-smoothed importance resampling of the guide's draws.

    Draws ``num_proposals`` (default ``10 * num_samples``) values :math:`z_s \sim q`, weighs
    each by :math:`p(x, z_s) / q(z_s)`, smooths the largest weights by a generalized Pareto fit
    (PSIS, Vehtari et al. 2024, https://arxiv.org/abs/1507.02646; ArviZ's ``psislw``), and
    resamples ``num_samples`` of them in proportion. As the proposals grow, the draws follow the
    posterior, not the guide: a guide that is too narrow or off-centre is corrected, as far as
    its draws reach. ``khat`` says how far that is (below 0.7 the estimate is reliable;
    Vehtari et al.); ``ess`` how many independent draws the weights are worth. A model whose
    plate subsamples raises ``ValueError``: the weights need the data whole.

    Arguments:
        model, guide: a Pyro model and a fitted guide, vectorizable over a particle plate.
        num_samples: resampled draws returned per site.
        num_proposals: guide draws weighed (more: a steadier tail fit).

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def model():
        ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def too_narrow_guide():
        ...     pyro.sample("x", dist.Normal(0.3, 0.8))
        >>> draws = af.importance_resample(model, too_narrow_guide, num_samples=4000)
        >>> x = draws.samples["x"]
        >>> bool(abs(x.mean()) < 0.1 and abs(x.std() - 1.0) < 0.1 and draws.khat < 0.7)
        True
    """
    import arviz as az  # slow to import; only this function and to_inference_data need it

    check_positive_int(num_samples, "num_samples")
    proposals = check_positive_int(num_proposals or 10 * num_samples, "num_proposals")
    trace = _check_full_data(model, "importance_resample", args, kwargs)
    latent = [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]
    nesting = max(
        (
            len(site["cond_indep_stack"])
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ),
        default=0,
    )
    with torch.no_grad():
        log_weights, model_trace, _ = vectorized_importance_weights(
            model, guide, *args, num_samples=proposals, max_plate_nesting=nesting, **kwargs
        )
    smoothed, khat = az.psislw(log_weights.detach().cpu().double().numpy())
    weights = torch.as_tensor(np.exp(smoothed))
    chosen = torch.multinomial(weights, num_samples, replacement=True)
    samples = {}
    for site in latent:
        value = model_trace.nodes[site["name"]]["value"]
        value = value.reshape((proposals,) + site["value"].shape)
        samples[site["name"]] = value[chosen.to(value.device)]
    return ImportanceDraws(
        samples=samples,
        khat=float(khat),
        ess=float(1.0 / (weights**2).sum()),
        log_weights=torch.as_tensor(smoothed),
    )


def _dim_names(site: dict[str, Any]) -> list[str]:
    """Names for every dim of a site's value: plate names where a plate sits, else generic."""
    value = site["value"]
    batch_dims = value.dim() - site["fn"].event_dim
    names = [f"{site['name']}_dim_{axis}" for axis in range(value.dim())]
    for frame in site["cond_indep_stack"]:
        axis = batch_dims + frame.dim
        if frame.vectorized and 0 <= axis < batch_dims:
            names[axis] = frame.name
    return names


def _as_array(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    **kwargs: Any,
) -> az.InferenceData:
    """An ``arviz.InferenceData`` of ``num_samples`` guide draws, as if from one MCMC chain.

    The ``posterior`` group holds every latent site with its real shape (plates become named
    dims), ``observed_data`` the model's observed sites, so ``az.summary``,
    ``az.plot_posterior`` and friends work on a guide as they do on MCMC output. A model whose
    plate subsamples raises ``ValueError``: ``observed_data`` would hold one random minibatch
    under the labels of the first data points.

    Example::

        >>> import torch, pyro, pyro.distributions as dist, pyro_arflow as af
        >>> def groups(counts):
        ...     rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        ...     with pyro.plate("group", len(counts)):
        ...         pyro.sample("count", dist.Poisson(rate), obs=counts)
        >>> counts = torch.tensor([3.0, 5.0, 4.0])
        >>> guide = af.AutoARFlow(groups, hidden_dims=[4])
        >>> idata = af.to_inference_data(groups, guide, counts, num_samples=200)
        >>> idata.posterior["rate"].shape, idata.observed_data["count"].dims
        ((1, 200), ('group',))
    """
    import arviz as az  # imported here: it is slow to import and only this function needs it

    check_positive_int(num_samples, "num_samples")
    _check_full_data(model, "to_inference_data", args, kwargs)
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        sites = [
            site
            for site in model_trace.nodes.values()
            if site["type"] == "sample"
            and not site_is_subsample(site)
            and not site["infer"].get("is_auxiliary")
        ]
        latent = [site for site in sites if not site["is_observed"]]
        observed = [site for site in sites if site["is_observed"]]
        draws = Predictive(
            model,
            guide=guide,
            num_samples=num_samples,
            return_sites=[site["name"] for site in latent],
        )(*args, **kwargs)
    posterior = {
        site["name"]: _as_array(draws[site["name"]].reshape((1, num_samples) + site["value"].shape))
        for site in latent
    }
    observed_data = {site["name"]: _as_array(site["value"]) for site in observed}
    dims = {site["name"]: _dim_names(site) for site in sites}
    return az.from_dict(posterior=posterior, observed_data=observed_data, dims=dims)
