"""LLMEngine: add requests, step, collect outputs. Synchronous and single
threaded; the server's async engine drives it from one thread."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pllm.core.config import EngineConfig
from pllm.core.detokenizer import Detokenizer, find_stop_string, visible_text
from pllm.core.executor import make_executor
from pllm.core.interfaces import Platform
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.outputs import RequestOutput
from pllm.core.request import Request, Sequence, SequenceStatus
from pllm.core.sampler import sample, top_logprobs
from pllm.core.sampling_params import SamplingParams, SamplingParamsError
from pllm.core.scheduler import Scheduler

logger = logging.getLogger("pllm")


class PromptTooLongError(SamplingParamsError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "prompt")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig, platform: Platform | None = None, loaded=None) -> None:
        from pllm.loader import load_model
        from pllm.plugins.manager import PluginManager

        t0 = time.perf_counter()
        plugins = PluginManager()
        self.platform = platform or plugins.select_platform(config.device.device)
        # The platform's own policy, then every plugin's pllm_update_config hook.
        self.config = config = plugins.update_config(self.platform, config)
        self._threads_before = torch.get_num_threads()  # given back at shutdown
        if config.device.num_threads:
            torch.set_num_threads(config.device.num_threads)
        torch.manual_seed(config.model.seed)
        mc = config.model
        self.loaded = loaded or load_model(mc.model, tokenizer=mc.tokenizer, chat_template=mc.chat_template)
        self.tokenizer = self.loaded.tokenizer
        self.model_name = mc.served_model_name or self.loaded.name
        self.eos_token_ids = frozenset(self.loaded.eos_token_ids)
        model_max = int(getattr(self.loaded.hf_config, "max_position_embeddings", 0) or 2048)
        if mc.max_model_len and mc.max_model_len > model_max:
            raise ValueError(f"max_model_len={mc.max_model_len} exceeds the model's context ({model_max})")
        self.max_model_len = mc.max_model_len or model_max

        self.executor = make_executor(config, self.platform, self.loaded, self.max_model_len)
        try:
            num_blocks = self.executor.init_kv_cache()
        except BaseException:
            self.executor.shutdown()  # no worker process outlives a failed start
            raise
        block_size = config.cache.block_size
        capacity = num_blocks * block_size
        if capacity < self.max_model_len:
            if mc.max_model_len:
                self.executor.shutdown()
                raise ValueError(
                    f"max_model_len={mc.max_model_len} needs {self.max_model_len} tokens of KV cache, "
                    f"only {capacity} fit; raise --kv-cache-memory or lower --max-model-len"
                )
            logger.warning("max_model_len lowered from %d to the KV capacity %d", self.max_model_len, capacity)
            self.max_model_len = capacity
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        logger.info(
            "pllm engine on %s: %s, KV cache %d blocks x %d = %d tokens (%s), max_model_len %d "
            "(%.1fs)", self.platform.name, self.model_name, num_blocks, block_size, capacity,
            str(self.executor.worker.kv_cache_dtype).removeprefix("torch."), self.max_model_len,
            time.perf_counter() - t0,
        )

    @classmethod
    def from_engine_args(cls, args) -> LLMEngine:
        return cls(args.create_engine_config())

    def shutdown(self) -> None:
        """Stop the executor's worker processes (tensor parallelism) and give
        the process its torch thread count back; the engine cannot step
        afterwards. Worker processes also stop at interpreter exit."""
        self.executor.shutdown()
        torch.set_num_threads(self._threads_before)

    # ---- requests ----------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.loaded.chat_template:
            raise ValueError("this model has no chat template; pass --chat-template")
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.loaded.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja errors on malformed messages
            raise ValueError(f"messages do not fit the chat template: {exc}") from exc

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise SamplingParamsError("prompt must not be empty", "prompt")
        vocab = self.loaded.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise SamplingParamsError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens; this model's context is {self.max_model_len} "
                f"tokens, which must also hold at least one output token"
            )
        req = Request(request_id, text, token_ids, params, self.eos_token_ids,
                      arrival_time=arrival_time or time.time())
        seq = Sequence(req, 0, list(token_ids), len(token_ids), generator=self._generator(params, 0))
        self.detokenizer.start(seq)
        if params.logprobs is not None:
            seq.logprobs = []
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator().manual_seed(params.seed + index * 1_000_003)

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.status = SequenceStatus.FINISHED_ABORTED
                    self.scheduler.remove(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(
            num_running=len({s.request.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request.request_id for s in self.scheduler.waiting}),
            kv_cache_usage=pool.usage, num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks, prefix_cache_queries=pool.num_queries,
            prefix_cache_hits=pool.num_hits, num_preemptions=self.scheduler.num_preemptions,
        )

    # ---- the step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                self._fail_unschedulable()
            return []
        now = time.time()
        for item in sched.scheduled:
            m = item.seq.request.metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        result = self.executor.execute(sched)

        touched: dict[str, Request] = {}
        for item in sched.scheduled:
            seq = item.seq
            if seq.seq_id in result.prompt_logits:
                self._add_prompt_logprobs(seq, item.num_new_tokens, result.prompt_logits[seq.seq_id])
            seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(seq)

        seqs: list[Sequence] = []
        rows: list[int] = []
        for row, item in enumerate(result.sampling):
            seq, req = item.seq, item.seq.request
            family = [seq]
            if not req.forked and req.params.n > 1:
                family += self._fork(seq)
            req.forked = True
            seqs += family
            rows += [row] * len(family)
        if seqs:
            logits = result.logits if len(rows) == len(result.sampling) else result.logits[rows]
            sampled = sample(logits, seqs)
            now = time.time()
            for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs):
                self._append_token(seq, token, logprobs, now)
                touched[seq.request.request_id] = seq.request
        return [self._output(req) for req in touched.values()]

    def _fork(self, parent: Sequence) -> list[Sequence]:
        children = []
        for index in range(1, parent.request.params.n):
            child = parent.fork(index, self._generator(parent.request.params, index))
            self.kv.share_blocks(child)
            parent.request.seqs.append(child)
            self.scheduler.add_running(child)
            children.append(child)
        return children

    def _append_token(self, seq: Sequence, token: int, logprobs, now: float) -> None:
        req, params = seq.request, seq.request.params
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if seq.num_output_tokens == 1 and seq.index == 0:
            req.metrics.first_token_time = now
            self.num_prompt_tokens += seq.num_prompt_tokens
        req.metrics.last_token_time = now
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
            for tid, lp in logprobs.items():
                lp.decoded_token = self.tokenizer.decode([tid])

        stopped_by_token = False
        if token in params.stop_token_ids:
            seq.status, seq.stop_reason, stopped_by_token = SequenceStatus.FINISHED_STOPPED, token, True
        elif token in req.eos_token_ids and not params.ignore_eos:
            seq.status, stopped_by_token = SequenceStatus.FINISHED_STOPPED, True
        if not stopped_by_token:  # the stop token's own text is never shown
            delta = self.detokenizer.step(seq)
            if seq.num_output_tokens >= params.min_tokens:
                stop = find_stop_string(seq, delta)
                if stop is not None:
                    seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        if not seq.is_finished and (
            (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
            or seq.num_tokens >= self.max_model_len
        ):
            seq.status = SequenceStatus.FINISHED_LENGTH
        if seq.is_finished:
            self.scheduler.remove(seq)
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)

    def _add_prompt_logprobs(self, seq: Sequence, num_new: int, logits: torch.Tensor) -> None:
        k = seq.request.params.prompt_logprobs
        logp = logits.float().log_softmax(-1).cpu()
        start = seq.num_computed_tokens
        for i in range(num_new):
            nxt = start + i + 1
            if nxt >= seq.num_prompt_tokens:
                break
            if len(seq.request.prompt_logprobs) != nxt:  # recomputed after preemption
                continue
            entry = top_logprobs(logp[i], seq.token_ids[nxt], k)
            for tid, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([tid])
            seq.request.prompt_logprobs.append(entry)

    def _output(self, req: Request) -> RequestOutput:
        ordered = sorted(req.seqs, key=lambda s: s.index)
        return req.output([visible_text(s) for s in ordered])

    def _fail_unschedulable(self) -> None:
        seq = self.scheduler.waiting[0]
        raise RuntimeError(
            f"request {seq.request.request_id!r} needs more KV-cache blocks than exist "
            f"({self.kv.num_total_blocks}); raise --kv-cache-memory"
        )
