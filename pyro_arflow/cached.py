r"""The base of every transform in the package: value and log-determinant computed together,
and the last pair kept.

A normalizing flow scores its own draw with :math:`\log q(y) = \log p(x) - \log|\det
\partial y / \partial x|`, which needs the log-determinant of the pair :math:`(x, y)` it just
computed. An autoregressive layer has it for free alongside :math:`y` (the sum of the log
scales it used), but recomputing it from :math:`(x, y)` costs another network pass, and for
an IAF's inverse a sequential solve. So a :class:`CachedTransform` computes both at once and
keeps the last ``(x, y, log|det dy/dx|)``: ``log_abs_det_jacobian`` on that pair costs
nothing, and with ``cache_size=1`` (the default) the pair also answers ``t(x)`` and
``t.inv(y)``. The cache is dropped by pickling, ``copy.deepcopy`` and :meth:`with_cache`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor
from torch.distributions import Transform

__all__ = ["CachedTransform"]


class CachedTransform(Transform):
    """A ``Transform`` whose value and log-determinant are computed together, one cache.

    Subclasses implement ``_call_with_log_det(x) -> (y, log_det)``,
    ``_inverse_with_log_det(y) -> (x, log_det)`` and ``_log_det(x, y)``, where ``log_det`` is
    always that of ``x -> y``. Combined with ``TransformModule`` (``class T(CachedTransform,
    TransformModule)``) it gives a trainable transform whose :meth:`with_cache` shares its
    parameters.

    Example::

        >>> import torch
        >>> from pyro_arflow.cached import CachedTransform
        >>> class Double(CachedTransform):
        ...     bijective = True
        ...     def _call_with_log_det(self, x):
        ...         return 2 * x, x.new_full(x.shape[:-1], 2.0).log() * x.shape[-1]
        ...     def _inverse_with_log_det(self, y):
        ...         return y / 2, y.new_full(y.shape[:-1], 2.0).log() * y.shape[-1]
        ...     def _log_det(self, x, y):
        ...         return self._call_with_log_det(x)[1]
        >>> double, x = Double(), torch.ones(3)
        >>> y = double(x)
        >>> double.inv(y) is x, double.log_abs_det_jacobian(x, y)  # both read the cache
        (True, tensor(2.0794))
    """

    _last: tuple[Tensor, Tensor, Tensor] | None = None

    def __init__(self, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)

    def __call__(self, x: Tensor) -> Tensor:
        last = self._last
        if self._cache_size and last is not None and last[0] is x:
            return last[1]
        y, log_det = self._call_with_log_det(x)
        self._last = (x, y, log_det)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        last = self._last
        if self._cache_size and last is not None and last[1] is y:
            return last[0]
        x, log_det = self._inverse_with_log_det(y)
        self._last = (x, y, log_det)
        return x

    def _call(self, x: Tensor) -> Tensor:
        return self._call_with_log_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_with_log_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] is y:
            return last[2]
        return self._log_det(x, y)

    def _call_with_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_with_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _log_det(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def with_cache(self, cache_size: int = 1) -> CachedTransform:
        """This transform with another ``cache_size``: a shallow copy, so a module's
        parameters, buffers and submodules are shared, not copied."""
        if cache_size == self._cache_size:
            return self
        twin = copy.copy(self)  # through __getstate__: no cache, no inverse
        for name in ("_parameters", "_buffers", "_modules"):  # own dicts, shared entries
            if name in twin.__dict__:
                twin.__dict__[name] = dict(twin.__dict__[name])
        twin._cache_size = cache_size
        return twin

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_last", None)
        state["_inv"] = None  # the inverse holds this transform: never carry it to a copy
        return state
