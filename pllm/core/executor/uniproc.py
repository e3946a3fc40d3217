"""One worker, in the engine's process."""

from __future__ import annotations

from pllm.core.config import EngineConfig
from pllm.core.interfaces import Platform
from pllm.core.runner import RunnerOutput
from pllm.core.scheduler import SchedulerOutput
from pllm.core.worker import Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig, platform: Platform, loaded) -> None:
        self.worker = Worker(config, platform, loaded)

    def init_kv_cache(self) -> int:
        num_blocks = self.worker.available_blocks()
        self.worker.allocate_kv_cache(num_blocks)
        return num_blocks

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute(sched)

    def shutdown(self) -> None:
        pass
