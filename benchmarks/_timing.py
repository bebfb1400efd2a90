"""Timing shared by the benchmarks: medians of methods that take turns."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each function over ``repeats`` rounds, after one warm-up call each.

    In every round each function runs once, in an order rotated by one from the round
    before, so machine drift hits all alike and nobody always runs right after the same one.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        rotation = round_ % len(names)
        for name in names[rotation:] + names[:rotation]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}
