"""Checks on the models that guides and diagnostics are given: plates, arguments, random state."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample


def subsampled_plates(trace: Trace) -> list[tuple[str, int, int]]:
    """``(name, drawn, size)`` of every plate in ``trace`` that draws a subsample of its data."""
    found = []
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            size, drawn = site["fn"].size, len(site["value"])
            if drawn < size:
                found.append((name, drawn, size))
    return found


def check_no_subsampled_latents(trace: Trace) -> None:
    """``ValueError`` naming the first latent site inside a subsampling plate: a guide over a
    fixed latent vector would learn the latents of one minibatch, taken as every data point's."""
    for name, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size < frame.full_size:
                raise ValueError(
                    f"the latent site {name!r} lies in the plate {frame.name!r}, which draws "
                    f"{frame.size} of its {frame.full_size} members: AutoARFlow learns one "
                    "latent vector and cannot give each data point its own latent. Guide such "
                    "local latents with Pyro's AutoNormal (per-plate parameters) or an "
                    "amortized guide (af.conditional_iaf reading each data point), and "
                    "AutoARFlow the globals (block the locals with poutine.block)"
                )


def argument_shapes(args: tuple, kwargs: dict) -> Any:
    """A comparable summary of model arguments: tensors by shape, plain values by value, other
    objects by identity."""

    def summary(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape))
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, tuple | list):
            return tuple(summary(item) for item in value)
        if isinstance(value, dict):
            return tuple(sorted((key, summary(item)) for key, item in value.items()))
        return ("object", id(value))

    return summary(args), summary(kwargs)


@contextmanager
def rng_state_kept() -> Iterator[None]:
    """Run a block and put every random state Pyro seeds (torch's, CUDA's, numpy's, Python's)
    back as it was."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
