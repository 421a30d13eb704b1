"""The instruct path's UNet step replayed from CUDA graphs.

At 256 px an SD 1.5-sized UNet step is bound by kernel launches, not by the GPU
(``../shared/GPU.md``: 29-36 ms eager, 8.6 ms for the same 3-branch step captured in a CUDA
graph). :class:`GraphedUNet` wraps a UNet with the call signature the samplers use and, on CUDA,
captures one graph per input shape the first time that shape is met (after a few eager warm-up
calls on a side stream, as ``torch.cuda.graphs`` requires), then serves every later call of that
shape by copying the inputs into the graph's static buffers and replaying it. Replays run the
kernels captured from an eager call of the same shapes, so the result is what the eager UNet
gives for those shapes.

Limits: inference only (no autograd through a replay, so the null-text inversion's optimisation
and prompt-to-prompt's attention recording stay eager); one graph per shape, at most
:data:`MAX_GRAPHS` kept (least recently used dropped) since each holds its own activation memory;
on the CPU, or if a capture fails, the wrapper calls the UNet eagerly (a failed capture is logged
once and that shape stays eager).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 4
"""Graphs kept at once (shapes: batch of branches x latent size x text length x mask or not)."""
WARMUP_CALLS = 3
"""Eager calls on a side stream before a capture (cuDNN/cuBLAS pick and cache their kernels)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timestep: torch.Tensor
    states: torch.Tensor
    mask: torch.Tensor | None
    cond: torch.Tensor | None
    output: torch.Tensor


@dataclass(frozen=True)
class UNetOutput:
    """What the samplers read from a UNet call: ``.sample``."""

    sample: torch.Tensor


class GraphedUNet:
    """A UNet whose forward is replayed from a CUDA graph per input shape (eager on the CPU).

    Call it as the samplers call a diffusers UNet:
    ``unet(sample, t, encoder_hidden_states=..., encoder_attention_mask=..., timestep_cond=...).sample``
    (``timestep_cond``: the fast sampler's guidance embedding, :mod:`engine.fast`).
    Not thread-safe: the engine calls it with its device lock held.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.config = unet.config
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._eager_shapes: set[tuple] = set()
        self.replays = 0  # calls served from a graph (tests and benchmarks read it)

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, *,
                 encoder_hidden_states: torch.Tensor,
                 encoder_attention_mask: torch.Tensor | None = None,
                 timestep_cond: torch.Tensor | None = None) -> UNetOutput:
        """The UNet's noise (or v) prediction for ``sample`` at ``timestep``."""
        mask, cond = encoder_attention_mask, timestep_cond
        if sample.device.type != "cuda":
            return UNetOutput(self._eager(sample, timestep, encoder_hidden_states, mask, cond))
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim != 0:  # the samplers pass one timestep for the whole batch
            return UNetOutput(self._eager(sample, t, encoder_hidden_states, mask, cond))
        key = (tuple(sample.shape), sample.dtype, tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype,
               None if mask is None else tuple(mask.shape), t.dtype, None if cond is None else tuple(cond.shape))
        if key in self._eager_shapes:
            return UNetOutput(self._eager(sample, t, encoder_hidden_states, mask, cond))
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(sample, t, encoder_hidden_states, mask, cond)
            except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
                log.warning("CUDA graph capture failed for shape %s (%s); this shape runs eagerly",
                            tuple(sample.shape), type(error).__name__)
                self._eager_shapes.add(key)
                return UNetOutput(self._eager(sample, t, encoder_hidden_states, mask, cond))
            self._graphs[key] = captured
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        captured.sample.copy_(sample)
        captured.timestep.copy_(t)
        captured.states.copy_(encoder_hidden_states)
        if captured.mask is not None:
            captured.mask.copy_(mask)
        if captured.cond is not None:
            captured.cond.copy_(cond)
        captured.graph.replay()
        self.replays += 1
        return UNetOutput(captured.output.clone())  # the next replay overwrites the static output

    def _eager(self, sample: torch.Tensor, t: Any, states: torch.Tensor, mask: torch.Tensor | None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if cond is None else {"timestep_cond": cond}
        return self.unet(sample, t, encoder_hidden_states=states, encoder_attention_mask=mask, **extra).sample

    def _capture(self, sample: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
                 mask: torch.Tensor | None, cond: torch.Tensor | None = None) -> _Captured:
        static = {"sample": sample.clone(), "timestep": t.clone(), "states": states.clone(),
                  "mask": None if mask is None else mask.clone(), "cond": None if cond is None else cond.clone()}

        def run() -> torch.Tensor:
            return self._eager(static["sample"], static["timestep"], static["states"], static["mask"], static["cond"])

        side = torch.cuda.Stream(device=sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream(sample.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        return _Captured(graph, static["sample"], static["timestep"], static["states"], static["mask"], static["cond"],
                         output)

    def clear(self) -> None:
        """Drops every captured graph (and the memory it holds)."""
        self._graphs.clear()
        self._eager_shapes.clear()
