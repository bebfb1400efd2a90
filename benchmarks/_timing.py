"""Timing shared by the benchmarks: medians of methods that take turns, on the CPU or a GPU."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu"
) -> dict[str, float]:
    """Median ms of each function over ``repeats`` rounds, after warm-up calls.

    In every round each function runs once, in an order rotated by one from the round
    before, so machine drift hits all alike and nobody always runs right after the same one.
    On the CPU a call is timed by the wall clock, after one warm-up call. On CUDA it is timed
    by CUDA events around it, synchronized after each call (so the time is the call's from
    first launch to last kernel), after three warm-up calls (the second captures any CUDA
    graph, the third is its first replay).
    """
    cuda = torch.device(device).type == "cuda"
    for fn in fns.values():
        for _ in range(3 if cuda else 1):
            fn()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        rotation = round_ % len(names)
        for name in names[rotation:] + names[:rotation]:
            times[name].append(_time_ms(fns[name], cuda))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _time_ms(fn: Callable[[], object], cuda: bool) -> float:
    if not cuda:
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def warm_up(device: str, seconds: float = 1.0) -> None:
    """Keep a GPU busy for a moment before timing, so its clocks have ramped up."""
    if torch.device(device).type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a = (a @ a).tanh_()
        torch.cuda.synchronize()


def describe_machine(device: str) -> str:
    """The processor (or GPU), core count, torch version and threads, for the report."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
        return f"machine: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
