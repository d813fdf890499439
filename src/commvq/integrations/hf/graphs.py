"""One cache layer's single-token decode step, captured as a CUDA graph and replayed.

Eager, a CommVQ decode step issues about twenty operations and two Triton launches per layer; in a
host-bound ``generate`` that host work, not the GPU's, sets the speed (``docs/benchmarks.md``).
Between two flushes the step's shapes do not change: the compressed blocks are fixed and the
full-precision window holds at most ``window + 1`` tokens. So the layer copies the query, its window
and (for a padded batch) the boolean attention mask into fixed buffers and replays the captured
step: four or five copies and one launch; the window's unused slots are masked by its length, held
on the GPU. A graph is captured on the second step with the same store and shapes (a store replaced
every step, as beam search does, stays eager) and dropped as soon as they change; the graphs of one
cache share one memory pool, since its layers replay them one after another.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


class GraphPool:
    """The memory pool that the decode graphs of one cache's layers allocate from. PyTorch frees a
    pool with its last graph, so a new one is made whenever no graph holds the current one."""

    def __init__(self) -> None:
        self._handle = None
        self.live = 0  # graphs captured into the current pool and not yet dropped

    def handle(self):
        if self._handle is None or self.live == 0:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


class DecodeGraph:
    """The captured decode step of one cache layer (see the module's docstring); ``replays`` counts
    the steps it served."""

    def __init__(self, pool: GraphPool) -> None:
        self.pool = pool
        self.seen = None
        self.replays = 0
        self.disabled = False
        self._drop()

    def release(self) -> None:
        """Drop the graph and its buffers (the next step runs eagerly)."""
        self._drop()
        self.seen = None

    def _drop(self) -> None:
        if getattr(self, "graph", None) is not None:
            self.pool.live -= 1
        self.key = self.graph = self.out = self.q = self.k = self.v = self.length = self.mask = None

    def run(
        self, layer: Any, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The step's output ``[B, Hq, 1, D]`` (fp32) by replay, or None: run it eagerly. ``mask``:
        the model's boolean attention mask ``[B, 1, 1, sink + compressed + window]`` (padded
        batches)."""
        if self.disabled or layer.num_window > layer.window + 1:
            return None
        key = (
            layer.store_version,
            layer.num_sink,
            layer.num_compressed,
            tuple(query.shape),
            query.dtype,
            query.device,
            scaling,
            None if mask is None else (mask.shape[0], mask.shape[1]),
        )
        if key != self.key:
            self._drop()
            if key != self.seen:  # first step with this store and these shapes
                self.seen = key
                return None
            try:
                self._capture(layer, query, scaling, mask)
            except (
                RuntimeError
            ) as exc:  # a capture the driver or allocator refuses: stay eager, say why
                self._drop()
                self.disabled = True
                warnings.warn(
                    f"CommVQCache: decode steps of layer {layer.layer_idx} stay eager, their CUDA "
                    f"graph failed to capture ({exc}); CommVQCache(graphs=False) silences this",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            self.key = key
        self._fill(layer, query, mask)
        self.graph.replay()
        self.replays += 1
        return self.out.clone()

    def _fill(self, layer: Any, query: torch.Tensor, mask: torch.Tensor | None) -> None:
        w = layer.num_window
        self.q.copy_(query)
        self.k[:, :, :w].copy_(layer.win_k)
        self.v[:, :, :w].copy_(layer.win_v)
        self.length.fill_(w)
        if mask is not None:  # the slots past the window are masked by the length anyway
            total = layer.num_sink + layer.num_compressed + w
            self.mask[..., :total].copy_(mask[..., -1:, :total])

    def _capture(
        self, layer: Any, query: torch.Tensor, scaling: float, mask: torch.Tensor | None
    ) -> None:
        """Fixed buffers for the step's inputs, filled, and the step on them recorded as a graph."""
        slots = layer.window + 1
        device = query.device
        self.q = torch.empty(query.shape, device=device, dtype=torch.float32)
        self.k = layer.win_k.new_zeros(*layer.win_k.shape[:2], slots, layer.win_k.shape[3])
        self.v = layer.win_v.new_zeros(*layer.win_v.shape[:2], slots, layer.win_v.shape[3])
        self.length = torch.zeros((), device=device, dtype=torch.long)
        if mask is not None:
            total = layer.num_sink + layer.num_compressed + slots
            self.mask = torch.ones(
                mask.shape[0], mask.shape[1], 1, total, device=device, dtype=torch.bool
            )
        self._fill(layer, query, mask)
        window = (self.k, self.v, self.length)
        self.graph = self._record(lambda: layer._mixed(self.q, self.mask, scaling, window), device)
        self.pool.live += 1

    def _record(self, step, device: torch.device) -> torch.cuda.CUDAGraph:
        """``step`` (the layer's attention on the fixed buffers) captured; its output buffer is
        ``out``."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(
            side
        ):  # warm-up outside the capture (compilation, workspaces, tables)
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle()):
            self.out = step()
        return graph
