"""Replaying a sequential solve as a CUDA graph.

A sequential solve is ``D`` steps of a few small kernels each: on a GPU its time goes to
launching them (about 150 microseconds a step for the LSTM, 200 for the masked network),
not to computing. A CUDA graph records the launches of one solve once and replays them as a
single launch. :class:`SolveGraphs` does that for a conditioner's ``recur``:

* only on CUDA, outside autograd (no input or parameter needs a gradient, or gradients are
  off), outside JIT tracing and outside another capture; everywhere else the solve runs as
  usual;
* a graph is captured the second time the same solve meets the same shapes, dtypes and
  device (a one-off call is not worth a capture), and kept per such key, a few at most;
* a graph reads the parameters through their addresses, so it is replayed only while those
  addresses are the ones it recorded: moving a module or replacing its tensors makes new
  graphs, in-place updates (an optimizer step, ``load_state_dict``) are seen by the old ones;
* the outputs are copied out of the graph's buffers, so a later replay never changes them.

The replayed kernels are the recorded ones, so the results are those of the eager solve.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SolveGraphs"]

Run = Callable[..., tuple[Tensor, ...]]


class SolveGraphs:
    """The captured solves of one module, keyed by what a capture bakes in.

    Arguments:
        max_graphs: how many graphs to keep (least recently used ones are dropped first).
    """

    def __init__(self, max_graphs: int = 4) -> None:
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._addresses: tuple[int, ...] = ()

    @staticmethod
    def applicable(first_input: Tensor) -> bool:
        """Whether a graph may stand in for a solve of ``first_input`` (and others) that
        autograd does not record: on CUDA, outside JIT traces and other captures."""
        if not first_input.is_cuda or torch.jit.is_tracing():
            return False
        return not torch.cuda.is_current_stream_capturing()

    def run(
        self, module: nn.Module, key: Hashable, run: Run, *inputs: Tensor | None
    ) -> tuple[Tensor, ...]:
        """``run(*inputs)``, by a graph when one is captured for ``key`` (see the module doc)."""
        addresses = tuple(
            t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers())
        )
        if addresses != self._addresses:  # moved or replaced tensors: old graphs are stale
            self.clear()
            self._addresses = addresses
        full_key = (key, *((None, None) if t is None else (t.shape, t.dtype) for t in inputs))
        graph = self._graphs.get(full_key)
        if graph is None:
            if full_key not in self._seen:
                self._remember(self._seen, full_key, None)
                return run(*inputs)
            graph = _Graph(run, inputs)
            self._remember(self._graphs, full_key, graph)
        self._graphs.move_to_end(full_key)
        return graph.replay(inputs)

    def clear(self) -> None:
        """Drop every graph (and the GPU memory it holds)."""
        self._graphs.clear()
        self._seen.clear()

    def _remember(self, store: OrderedDict, key: Hashable, value: Any) -> None:
        store[key] = value
        while len(store) > self.max_graphs:
            store.popitem(last=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_graphs": self.max_graphs}  # graphs belong to one process and device

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_graphs"])  # type: ignore[misc]


class _Graph:
    """One captured solve: static input buffers, the graph, its output buffers."""

    def __init__(self, run: Run, inputs: tuple[Tensor | None, ...]) -> None:
        self.inputs = tuple(None if t is None else t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the main stream, as CUDA graphs want
            run(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run(*self.inputs)

    def replay(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        for static, given in zip(self.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(given)
        self.graph.replay()
        return tuple(output.clone() for output in self.outputs)
