"""CUDA graphs for decode-only steps (HIP graphs on ROCm, through the same
torch API).

A 30-layer decode step is a few hundred small kernel launches; at small
batches the GPU waits on the host issuing them. Recording the step once per
batch size and replaying it issues the whole step in one call. The padding,
bucketing and persistent buffers live in ``pllm.core.graphs``; this class
only records.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pllm.core.graphs import StaticDecodeRunner


class CUDAGraphDecodeRunner(StaticDecodeRunner):
    """Records each bucket's forward into a ``torch.cuda.CUDAGraph``; all
    graphs share one memory pool (recorded largest first, so the smaller
    ones fit in the largest one's memory)."""

    _pool = None

    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream first (Triton compiles on its first launch,
        # and the allocator must not be touched for the first time mid-capture).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # "thread_local": only this thread must not touch the device while it
        # records. Under tensor parallelism torch's NCCL watchdog thread polls
        # the warm-up's collectives meanwhile, which the default ("global")
        # mode turns into a capture error (on ROCm 7 as on CUDA).
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay
