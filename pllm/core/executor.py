"""Workers behind an executor. The engine talks to the executor only; one
worker in this process today, a worker process per device for tensor
parallelism later."""

from __future__ import annotations

import logging
import time

import torch

from pllm.core.config import EngineConfig
from pllm.core.interfaces import AttentionMetadata, Platform
from pllm.core.runner import ModelRunner, RunnerOutput
from pllm.core.scheduler import SchedulerOutput
from pllm.models import get_model_class
from pllm.models.layers import ForwardContext

logger = logging.getLogger("pllm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(config: EngineConfig, platform: Platform) -> torch.dtype:
    caps = platform.capabilities
    if config.model.dtype == "auto":
        return caps.default_dtype
    dtype = _DTYPES[config.model.dtype]
    if not caps.supports_dtype(dtype):
        names = ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes)
        raise ValueError(f"dtype={config.model.dtype!r} is not supported on {platform.name}; supported: {names}")
    return dtype


class Worker:
    """Holds the model and the KV cache on one device."""

    def __init__(self, config: EngineConfig, platform: Platform, loaded, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.config = config
        self.platform = platform
        self.device = platform.device(0)
        self.dtype = resolve_dtype(config, platform)
        caps = platform.capabilities
        if not caps.supports_block_size(config.cache.block_size):
            raise ValueError(
                f"block_size={config.cache.block_size} is not supported on {platform.name}; "
                f"supported: {', '.join(map(str, caps.block_sizes))}"
            )
        t0 = time.perf_counter()
        cls = get_model_class(loaded.hf_config.model_type)
        with torch.device("meta"):
            model = cls(loaded.hf_config, max_positions=max_model_len)
        model = model.to_empty(device=self.device)
        model.rotary.reset_tables()
        model.load_weights(loaded.weights())
        # The rope tables stay fp32 (as in transformers); only weights change dtype.
        model = model.to(self.dtype).eval().requires_grad_(False)
        model.tie_weights()
        model.rotary.cos, model.rotary.sin = model.rotary.cos.float(), model.rotary.sin.float()
        self.model = platform.prepare_model(model, config)
        spec = self.model.spec
        if not caps.supports_head_dim(spec.head_dim):
            raise ValueError(f"head_dim={spec.head_dim} is not supported on {platform.name}")
        logger.info("loaded %s (%s) in %.1fs", loaded.name, self.dtype, time.perf_counter() - t0)
        self.backend = platform.make_attention_backend()
        self.spec = spec

    def bytes_per_block(self) -> int:
        spec, bs = self.spec, self.config.cache.block_size
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * bs * spec.num_kv_heads * spec.head_dim * elem * self.model.num_layers

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward pass of a full step's token budget (one sequence, a
        throwaway cache), plus the LM head for ``max_num_seqs`` rows: the
        activation peak the KV cache must leave room for."""
        bs = self.config.cache.block_size
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.model.rotary.max_positions)
        num_blocks = -(-num_tokens // bs)
        spec, dev = self.spec, self.device
        shape = self.backend.kv_cache_shape(num_blocks, bs, spec.num_kv_heads, spec.head_dim)
        caches = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.model.num_layers)]
        metadata = AttentionMetadata(
            num_seqs=1, num_tokens=num_tokens, num_decodes=0, max_query_len=num_tokens,
            max_seq_len=num_tokens, block_size=bs,
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev).unsqueeze(0),
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=dev),
            query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens],
        )
        metadata = self.backend.prepare_metadata(metadata)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        positions = torch.arange(num_tokens, device=dev)
        hidden = self.model(ids, positions, ForwardContext(self.backend, metadata, caches))
        rows = min(self.config.scheduler.max_num_seqs, num_tokens)
        self.model.compute_logits(hidden[:rows])
        del caches, hidden
        self.platform.synchronize()

    def init_kv_cache(self) -> int:
        if self.platform.capabilities.profiles_memory:
            self.profile_run()
        allocator = self.platform.make_kv_cache_allocator()
        num_blocks = allocator.num_blocks(self.config.cache, self.bytes_per_block())
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache; raise --kv-cache-memory")
        spec = self.spec
        shape = self.backend.kv_cache_shape(num_blocks, self.config.cache.block_size,
                                            spec.num_kv_heads, spec.head_dim)
        caches = allocator.allocate(self.model.num_layers, shape, self.dtype, self.device)
        decode_runner = None
        if not self.config.device.enforce_eager:
            decode_runner = self.platform.make_decode_runner(
                self.model, self.backend, caches, self.config, self.max_model_len)
            if decode_runner is not None:
                decode_runner.capture_all()
        self.runner = ModelRunner(self.model, self.backend, caches, self.config.cache.block_size,
                                  self.device, decode_runner)
        return num_blocks

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)


class UniProcExecutor:
    def __init__(self, config: EngineConfig, platform: Platform, loaded, max_model_len: int) -> None:
        if config.parallel.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={config.parallel.tensor_parallel_size} is not supported yet; use 1"
            )
        self.worker = Worker(config, platform, loaded, max_model_len)

    def init_kv_cache(self) -> int:
        return self.worker.init_kv_cache()

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute(sched)
