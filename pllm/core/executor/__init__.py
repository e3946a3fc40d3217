"""Workers behind an executor. The engine talks to the executor only::

    UniProcExecutor     one worker, in this process          (uniproc.py)
    MultiprocExecutor   tensor parallelism over N ranks: rank 0's worker in
                        this process, ranks 1..N-1 each in a process of its
                        own                                    (multiproc.py)
    RayExecutor         the same over a Ray cluster: ranks 1..N-1 each in a
                        Ray actor, on any node                 (ray_executor.py)

N is tensor_parallel_size x pipeline_parallel_size. With one rank there is
nothing to distribute: the backend is not used. Under pipeline parallelism
(``pllm.core.pipeline``) the engine starts steps with ``submit`` and takes
their results with ``collect``, several steps in flight.
"""

from __future__ import annotations

from typing import Protocol

from pllm.core.config import EngineConfig
from pllm.core.interfaces import Platform
from pllm.core.runner import RunnerOutput
from pllm.core.scheduler import SchedulerOutput
from pllm.core.worker import Worker


class WorkerProcessError(RuntimeError):
    """A tensor-parallel rank failed; the message carries its traceback."""


class ExecutorBrokenError(RuntimeError):
    """The executor cannot run another step (a tensor-parallel rank failed or
    a step broke off mid-way, leaving the ranks out of step); the engine
    must be rebuilt."""


class Executor(Protocol):
    """What the engine calls. ``worker`` is rank 0's (for introspection:
    benchmarks read its model and cache)."""

    worker: Worker

    def init_kv_cache(self) -> int:
        """Size the KV cache (the smallest any rank can hold), allocate it on
        every rank; returns the number of blocks."""

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one scheduled step on every rank; what rank 0 sampled comes back."""

    # Executors of several ranks also have, for pipeline parallelism,
    # ``submit(sched) -> handle`` (start a step: its inputs out, stage 0's
    # layers run) and ``collect(handle) -> RunnerOutput`` (its sampled
    # tokens, once the last stage's logits are back), in submission order.

    def shutdown(self) -> None:
        """Stop the ranks and close their communicators; idempotent."""

    # Executors of several ranks also say ``broken: str | None``: why no
    # step can run any more (a rank died), as soon as they know.


class RankZeroSteps:
    """``execute``, ``submit`` and ``collect`` of an executor of several
    ranks: rank 0's worker, through the executor's ``_run(call, arg)``,
    which turns any failure into ``ExecutorBrokenError``."""

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self._run(self.worker.execute, sched)

    def submit(self, sched: SchedulerOutput):
        return self._run(self.worker.submit, sched)

    def collect(self, step) -> RunnerOutput:
        return self._run(self.worker.collect, step)


def join_group(platform: Platform, size: int, init_method: str, poll, name: str):
    """Rank 0's communicator, joined on a thread of its own while ``poll()``
    runs every 0.1 s on the caller's: it raises as soon as another rank
    fails to start, instead of after the rendezvous times out."""
    import threading

    box: dict = {}

    def join() -> None:
        try:
            box["comm"] = platform.make_communicator(0, size, init_method)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=join, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        poll()
    if "error" in box:
        raise box["error"]
    return box["comm"]


def make_executor(config: EngineConfig, platform: Platform, loaded) -> Executor:
    if config.parallel.world_size == 1:
        from pllm.core.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config, platform, loaded)
    if config.parallel.distributed_executor_backend == "ray":
        from pllm.core.executor.ray_executor import RayExecutor

        return RayExecutor(config, platform, loaded)
    from pllm.core.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config, platform, loaded)
