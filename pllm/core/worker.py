"""One rank's worker: its shard of the model and its KV cache on one device.

Every executor runs one per rank (rank 0 in the engine's process). The
config it gets is resolved (``pllm.core.resolve``): dtypes, block size and
``max_model_len`` are read from it, never passed alongside.
"""

from __future__ import annotations

import logging
import time

import torch

from pllm.core.config import EngineConfig
from pllm.core.interfaces import AttentionMetadata, Communicator, ForwardContext, Platform
from pllm.core.runner import ModelRunner, PreparedStep, RunnerOutput, StepInputs
from pllm.core.scheduler import SchedulerOutput

logger = logging.getLogger("pllm")


# Mixture-of-experts routers (and Qwen2-MoE's shared-expert gate) stay in
# full precision under --quantization int8 and fp8: rounding them moves
# tokens between experts.
_ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")
# fp8 leaves the embedding and the LM head in the model dtype too (as fp8
# checkpoints do): they are lookups and one product, and the head's logits
# decide the tokens.
_FP8_DENSE = (*_ROUTERS, "embed_tokens.weight", "lm_head.weight")
# --quantization values whose weights are rounded at load (build_model's round_to).
_ROUNDED = ("int8", "fp8")


class KVCacheSizeError(ValueError):
    """The KV-cache budget holds no block."""


class Worker:
    """Holds the model (this rank's shard of it) and the KV cache on one device."""

    def __init__(self, config: EngineConfig, platform: Platform, loaded, rank: int = 0,
                 comm: Communicator | None = None, device_index: int | None = None) -> None:
        """``rank``: of every rank (tensor and pipeline parallel), ``comm``
        their communicator. ``device_index``: the device this rank runs on
        (default: ``rank``; a Ray actor sees only its own device, index 0)."""
        from pllm.models import build_model, describe_model  # the core's one seam to the models
        from pllm.models.parallel import PipelineStage, TensorParallel

        assert config.resolved, "the worker takes a resolved config"
        self.config, self.platform, self.rank = config, platform, rank
        tp_size, pp_size = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
        stage, tp_rank = divmod(rank, tp_size)
        tp_comm = comm
        self.links = None  # point-to-point traffic between pipeline stages
        if pp_size > 1:  # every rank makes every group, in this order
            # Each stage's own tensor-parallel group.
            groups = [comm.new_group(list(range(s * tp_size, (s + 1) * tp_size)))
                      if tp_size > 1 else None for s in range(pp_size)]
            tp_comm = groups[stage]
            # The logits' way back to rank 0, apart from the residual stream
            # going forward: with two stages both go between the same two
            # ranks, and on one NCCL communicator (one stream) a large send
            # each way, each queued behind the other's, would wait for ever.
            logits_comm = comm.new_group([0, (pp_size - 1) * tp_size])
        self.tp = TensorParallel(tp_rank, tp_size, tp_comm)
        self.stage = PipelineStage(stage, pp_size, loaded.hf_config.num_hidden_layers)
        self.device = platform.device(rank if device_index is None else device_index)
        self.info = describe_model(loaded.hf_config, self.tp.size)
        if pp_size > 1:
            from pllm.core.pipeline import StageLinks

            self.links = StageLinks(comm, logits_comm, rank, tp_size, pp_size,
                                    self.info.hidden_size, loaded.hf_config.vocab_size,
                                    config.model.torch_dtype, self.device)
        t0 = time.perf_counter()
        self.model = build_model(
            loaded.hf_config, loaded.weights(), max_model_len=config.model.max_model_len,
            dtype=config.model.torch_dtype, device=self.device, tp=self.tp,
            kv_cache_dtype=config.cache.torch_cache_dtype,
            prepare=lambda model: platform.prepare_model(model, config),
            quantized=self._kept_quantized(loaded),
            round_to=config.model.quantization if config.model.quantization in _ROUNDED else None,
            stage=self.stage,
        )
        if rank == 0:
            logger.info("loaded %s (%s) in %.1fs", loaded.name, config.model.dtype,
                        time.perf_counter() - t0)
        self.backend = platform.make_attention_backend()
        self.runner: ModelRunner | None = None
        self.draft_model, self.draft_info = None, None
        spec = config.speculative
        if spec is not None and spec.method == "draft_model":
            self._load_draft(spec.model)

    def _load_draft(self, path: str) -> None:
        """Speculative decoding's draft model: this rank's shard of it, as
        the target's (``pllm.core.draft``)."""
        from pllm.loader import load_model
        from pllm.models import build_model, describe_model

        config, platform = self.config, self.platform
        t0 = time.perf_counter()
        loaded = load_model(path)
        self.draft_info = describe_model(loaded.hf_config, self.tp.size)
        self.draft_model = build_model(
            loaded.hf_config, loaded.weights(), max_model_len=config.model.max_model_len,
            dtype=config.model.torch_dtype, device=self.device, tp=self.tp,
            kv_cache_dtype=config.cache.torch_cache_dtype,
            prepare=lambda model: platform.prepare_model(model, config),
            quantized=self._kept_quantized(loaded),
            round_to=config.model.quantization if config.model.quantization in _ROUNDED else None,
        )
        if self.rank == 0:
            logger.info("loaded draft model %s in %.1fs", loaded.name, time.perf_counter() - t0)

    def _kept_quantized(self, loaded) -> dict[str, str]:
        """{HF name: format} of ``loaded``'s tensors that stay in their GGUF
        blocks: with --quantization gguf, those in a format the platform
        multiplies (``weight_formats``)."""
        quantization = self.config.model.quantization
        if quantization == "int8":  # every matrix but the routers, rounded at load
            from pllm.core.resolve import INT8_FORMAT

            return {name: INT8_FORMAT for name in loaded.weight_names
                    if name.endswith(".weight") and not name.endswith(_ROUTERS)}
        if quantization == "fp8":  # every linear layer's matrix but the routers and the head
            from pllm.models.quant import FP8_FORMAT

            return {name: FP8_FORMAT for name in loaded.weight_names
                    if name.endswith(".weight") and not name.endswith(_FP8_DENSE)}
        if quantization != "gguf":
            return {}
        keep = set(self.platform.capabilities.weight_formats)
        return {name: fmt for name, fmt in loaded.weight_formats.items() if fmt in keep}

    def bytes_per_block(self, all_stages: bool = False) -> int:
        """A block's bytes on this rank: the target's K/V of its tokens (of
        this pipeline stage's layers; ``all_stages``: of every layer), and
        the draft model's where there is one (it shares the block tables)."""
        cache = self.config.cache
        elem = cache.torch_cache_dtype.itemsize
        layers = [self.info.num_layers if all_stages else self.stage.num_layers]
        infos = [self.info]
        if self.draft_info is not None:
            infos.append(self.draft_info)
            layers.append(self.draft_info.num_layers)
        return sum(2 * cache.block_size * info.num_kv_heads * info.head_dim * elem * n
                   for info, n in zip(infos, layers))

    def _cache_shape(self, num_blocks: int, info=None) -> tuple[int, ...]:
        info = info or self.info
        return self.backend.kv_cache_shape(num_blocks, self.config.cache.block_size,
                                           info.num_kv_heads, info.head_dim)

    @torch.inference_mode()
    def profile_run(self) -> int:
        """One forward pass of a full step's token budget (one sequence, a
        throwaway cache), plus the LM head for ``max_num_seqs`` rows: the
        activation peak the KV cache must leave room for. Returns the bytes
        of the throwaway cache."""
        bs = self.config.cache.block_size
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.config.model.max_model_len)
        num_blocks = -(-num_tokens // bs)
        dev = self.device
        caches = [torch.zeros(self._cache_shape(num_blocks), dtype=self.config.cache.torch_cache_dtype,
                              device=dev) for _ in range(self.stage.num_layers)]
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
        ctx = ForwardContext(self.backend, metadata, caches)
        if self.stage.is_first:
            hidden = self.model(ids, positions, ctx)
        else:  # what the stage before would send
            hidden = self.model(ids, positions, ctx, torch.zeros(
                num_tokens, self.info.hidden_size, dtype=self.config.model.torch_dtype, device=dev))
        rows = min(self.config.scheduler.max_num_seqs, num_tokens)
        if self.stage.is_last:
            self.model.compute_logits(hidden[:rows])
        if self.links is not None and self.rank == 0:  # the last stage's logits, received
            received = torch.empty(rows, self.links.vocab_size, dtype=torch.float32, device=dev)
            del received
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        del caches, hidden
        self.platform.synchronize()
        return cache_bytes

    def available_blocks(self) -> int:
        """How many KV-cache blocks fit on this rank's device (or exactly
        ``num_blocks_override``). Ranks that share one device (the host)
        share its budget: a block costs every rank's bytes of it."""
        cache = self.config.cache
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        caps = self.platform.capabilities
        allocator = self.platform.make_kv_cache_allocator()
        if caps.profiles_memory:
            allocator.profile(self.profile_run)
        per_block = self.bytes_per_block()
        if caps.ranks_share_device:  # every rank's bytes of a block: each stage's, tp times
            per_block = self.bytes_per_block(all_stages=True) * self.tp.size
        num_blocks = allocator.num_blocks(cache, per_block)
        if num_blocks < 1:
            raise KVCacheSizeError("no memory left for the KV cache; raise --kv-cache-memory")
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The cache of ``num_blocks`` blocks (the same on every rank), the
        decode graphs over it where the platform has them, and the runner."""
        config, platform = self.config, self.platform
        allocator = platform.make_kv_cache_allocator()
        caches = allocator.allocate(self.stage.num_layers, self._cache_shape(num_blocks),
                                    config.cache.torch_cache_dtype, self.device)
        decode_runner = None
        graphs = platform.capabilities.supports_graphs and not config.device.enforce_eager
        if graphs and self.info.dynamic_routing:
            logger.info("decode graphs off: %s routes tokens to experts by their values",
                        self.info.model_type)
            graphs = False
        if graphs and self.links is not None:
            if self.rank == 0:
                logger.info("decode graphs off: a pipeline stage's step starts from the "
                            "previous stage's sends")
            graphs = False
        if graphs:
            decode_runner = platform.make_decode_runner(self.model, self.backend, caches, config)
            if decode_runner is not None:
                decode_runner.capture_all()
        self.runner = ModelRunner(self.model, self.backend, caches, config, self.device,
                                  platform.capabilities, decode_runner,
                                  graph_break=platform.graph_break)
        if self.draft_model is not None:
            from pllm.core.draft import DraftRunner

            info = self.draft_info
            draft_caches = allocator.allocate(info.num_layers, self._cache_shape(num_blocks, info),
                                              config.cache.torch_cache_dtype, self.device)
            self.runner.drafter = DraftRunner(ModelRunner(
                self.draft_model, platform.make_attention_backend(), draft_caches, config,
                self.device, platform.capabilities, graph_break=platform.graph_break),
                keep_probs=self.rank == 0)
        if platform.capabilities.static_shapes:
            self.warm_up()

    def warm_up(self) -> None:
        """Compile every step shape now (static-shape platforms), not in a request."""
        before = self.platform.compilations()
        t0 = time.perf_counter()
        timings = self.runner.warm_up(sample_on_this_rank=self.rank == 0)
        if self.rank != 0:
            return
        for name, seconds in timings:
            logger.info("compiled %s in %.2fs", name, seconds)
        after = self.platform.compilations()
        counted = ""
        if before is not None and after is not None:
            counted = f"; {after[0] - before[0]} programs, {after[1] - before[1]:.1f}s compiling"
        logger.info("warm-up: %d step shapes in %.1fs%s", len(timings),
                    time.perf_counter() - t0, counted)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if self.links is not None:
            return self.collect(self.submit(sched))
        return self.runner.execute(sched)

    def submit(self, sched: SchedulerOutput) -> PreparedStep:
        """Rank 0 under pipeline parallelism: start a step (its inputs to
        every rank, stage 0's layers, their output to stage 1)."""
        step = self.runner.begin(sched)
        self.links.send_hidden(self.runner.forward(step.inputs))
        return step

    def collect(self, step: PreparedStep) -> RunnerOutput:
        """Rank 0 under pipeline parallelism: a started step's logits, from
        the last stage, sampled."""
        inputs = step.inputs
        logits, spans = self.links.recv_logits(len(inputs.sample_rows), inputs.prompt_spans)
        return self.runner.finish(step, logits, spans)

    def execute_inputs(self, inputs: StepInputs) -> None:
        """A step rank 0 prepared (ranks other than 0): the forward and the
        LM head, whose collectives pair with the other ranks' of the stage.
        Under pipeline parallelism the stage's layers run on what the stage
        before sent, and their output goes on to the next stage (or, from
        the last, the logits to rank 0)."""
        links = self.links
        if links is None:
            self.runner.logits(self.runner.forward(inputs), inputs)
            return
        intermediate = None if links.is_first else links.recv_hidden(len(inputs.input_ids))
        hidden = self.runner.forward(inputs, intermediate)
        if not links.is_last:
            links.send_hidden(hidden)
            return
        links.send_logits(*self.runner.logits(hidden, inputs))

    def execute_draft(self, plan) -> None:
        """The draft model's passes of a step rank 0 planned (ranks other than 0)."""
        self.runner.drafter.propose(plan)
