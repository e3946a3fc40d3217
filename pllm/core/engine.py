"""LLMEngine: add requests, step, collect outputs. Synchronous and single
threaded; the server's async engine drives it from one thread."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from pllm.core.config import EngineConfig
from pllm.core.detokenizer import Detokenizer
from pllm.core.executor import ExecutorBrokenError, make_executor
from pllm.core.interfaces import Platform
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.outputs import RequestOutput
from pllm.core.request import Request, SequenceStatus
from pllm.core.resolve import resolve_config
from pllm.core.sampling_params import SamplingParams, SamplingParamsError
from pllm.core.scheduler import Scheduler, SchedulerOutput
from pllm.core.spec_decode import SpecDecodeStats, make_proposer

logger = logging.getLogger("pllm")


class PromptTooLongError(SamplingParamsError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "prompt")


def check_text(text: str, param: str) -> None:
    """Text a tokenizer can take: valid Unicode (JSON can carry a lone UTF-16
    surrogate, which no encoder accepts)."""
    if not isinstance(text, str):
        raise SamplingParamsError(f"{param} must be text, got {type(text).__name__}", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SamplingParamsError(
            f"{param} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}", param) from None


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
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding on


class LLMEngine:
    def __init__(self, config: EngineConfig, platform: Platform | None = None, loaded=None) -> None:
        from pllm.loader import load_model
        from pllm.models import describe_model
        from pllm.plugins.manager import PluginManager

        t0 = time.perf_counter()
        plugins = PluginManager()
        self.platform = platform or plugins.select_platform(config.device.device)
        # The platform's own policy, then every plugin's pllm_update_config hook.
        config = plugins.update_config(self.platform, config)
        if config.speculative is not None and self.platform.capabilities.token_buckets:
            raise ValueError(
                f"speculative decoding is not supported on {self.platform.name} yet: its steps "
                f"have static shapes, and draft rows would change them")
        mc = config.model
        self.loaded = loaded or load_model(mc.model, tokenizer=mc.tokenizer, chat_template=mc.chat_template)
        # Every "decide for me" value decided once, against platform and model.
        info = describe_model(self.loaded.hf_config, config.parallel.tensor_parallel_size,
                              self.loaded.weight_formats.values())
        if config.speculative is not None and config.speculative.method == "draft_model":
            from pllm.core.draft import check_draft_model

            check_draft_model(self.loaded, load_model(config.speculative.model),
                              config.parallel.tensor_parallel_size, self.platform)
        self.config = config = resolve_config(config, self.platform, info)
        self.platform.setup_process(config, 0)
        torch.manual_seed(mc.seed)
        self.tokenizer = self.loaded.tokenizer
        self.model_name = mc.served_model_name or self.loaded.name
        self.eos_token_ids = frozenset(self.loaded.eos_token_ids)

        self.executor = None
        try:
            self.executor = make_executor(config, self.platform, self.loaded)
            num_blocks = self.executor.init_kv_cache()
        except BaseException:
            self.shutdown()  # no worker process outlives a failed start
            raise
        block_size = config.cache.block_size
        capacity = num_blocks * block_size
        self.max_model_len = config.model.max_model_len
        if capacity < self.max_model_len:
            if mc.max_model_len:
                self.shutdown()
                raise ValueError(
                    f"max_model_len={mc.max_model_len} needs {self.max_model_len} tokens of KV cache, "
                    f"only {capacity} fit; raise --kv-cache-memory or lower --max-model-len"
                )
            logger.warning("max_model_len lowered from %d to the KV capacity %d", self.max_model_len, capacity)
            self.max_model_len = capacity
            self.config = config = dataclasses.replace(
                config, model=dataclasses.replace(config.model, max_model_len=capacity))
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.detokenizer, self.max_model_len,
                                   proposer=make_proposer(config.speculative),
                                   pipeline_depth=config.parallel.pipeline_parallel_size)
        # Pipeline parallelism: up to one batch in flight per stage, started
        # (submitted) and not yet collected, oldest first.
        self.pipeline_depth = config.parallel.pipeline_parallel_size
        self.in_flight: deque[tuple[SchedulerOutput, object, float]] = deque()
        self.max_in_flight = 0  # the most batches ever in flight at once
        logger.info(
            "pllm engine on %s: %s, KV cache %d blocks x %d = %d tokens (%s), max_model_len %d "
            "(%.1fs)", self.platform.name, self.model_name, num_blocks, block_size, capacity,
            config.cache.cache_dtype, self.max_model_len, time.perf_counter() - t0,
        )

    @classmethod
    def from_engine_args(cls, args) -> LLMEngine:
        return cls(args.create_engine_config())

    @property
    def broken(self) -> str | None:
        """Why the executor cannot run another step (a tensor-parallel rank
        died or failed), else None: known as soon as it happens, even while
        no step runs."""
        return getattr(self.executor, "broken", None)

    def shutdown(self) -> None:
        """Stop the executor's worker processes (tensor parallelism) and give
        the process its torch thread count back; the engine cannot step
        afterwards. Worker processes also stop at interpreter exit."""
        while getattr(self, "in_flight", None) and not self.broken:
            # Batches in flight (pipeline parallelism): their stages finish
            # them and rank 0 takes the logits, so every rank can stop at once.
            try:
                self.executor.collect(self.in_flight.popleft()[1])
            except Exception:  # noqa: BLE001 - the executor is broken: it stops below
                break
        if self.executor is not None:
            self.executor.shutdown()
        if getattr(self, "scheduler", None) is not None and self.scheduler.grammars is not None:
            self.scheduler.grammars.shutdown()
        self.platform.teardown_process()

    # ---- requests ----------------------------------------------------------
    # Prompts are tokenized and chat templates rendered here and nowhere else:
    # the offline API and the server both come through these methods.
    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """A text prompt's token ids, with the model's special tokens (BOS)."""
        check_text(prompt, "prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """A conversation as prompt text and token ids. The template writes
        the special tokens it wants, so none are added when tokenizing."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        check_text(text, "messages")
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def chat_template_renders_tools(self) -> bool:
        """Whether the chat template tells the model about the tools it is given."""
        return "tools" in (self.loaded.chat_template or "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """``tools``: OpenAI's tool definitions, which the template renders
        (transformers' ``tools`` argument) if it knows how."""
        if not self.loaded.chat_template:
            raise ValueError("this model has no chat template; pass --chat-template")
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.loaded.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, tools=tools or None,
            )
        except Exception as exc:  # jinja errors on malformed messages
            raise ValueError(f"messages do not fit the chat template: {exc}") from exc

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """``prompt``: text (tokenized here), token ids, or vLLM's dict form
        ``{"prompt": text, "prompt_token_ids": ids}`` for a prompt tokenized
        already (the text is then only reported back)."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, dict):
            text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if token_ids is None:
                if not isinstance(text, str):
                    raise SamplingParamsError("a prompt dict needs 'prompt' or 'prompt_token_ids'",
                                              "prompt")
                token_ids = self.tokenize(text)
            token_ids = list(token_ids)
        elif isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise SamplingParamsError("prompt must not be empty", "prompt")
        vocab = self.loaded.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise SamplingParamsError(f"prompt token ids must be integers in [0, {vocab})",
                                      "prompt")
        params.check_against_model(vocab)
        if params.beam_search is not None and self.scheduler.proposer is not None:
            raise SamplingParamsError(
                "beam search cannot run with speculative decoding: each beam's step needs the "
                "proposals of one position; start the engine without --speculative-config",
                "beam_search")
        grammar = None
        if params.structured_outputs is not None:
            from pllm.core.structured import check

            check(params.structured_outputs)  # parsed here; compiled on a worker thread
            grammar = self._grammars().get(params.structured_outputs)
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens; this model's context is {self.max_model_len} "
                f"tokens, which must also hold at least one output token"
            )
        self.scheduler.add_request(Request(request_id, text, token_ids, params, self.eos_token_ids,
                                           arrival_time=arrival_time or time.time(),
                                           grammar=grammar))

    def _grammars(self):
        """Structured outputs' grammar compiler, made on first use."""
        if self.scheduler.grammars is None:
            from pllm.core.structured import GrammarCache

            self.scheduler.grammars = GrammarCache(
                self.tokenizer, self.loaded.hf_config.vocab_size, self.eos_token_ids)
        return self.scheduler.grammars

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.scheduler.finish_requests(ids, SequenceStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or a batch still in flight (pipeline
        parallelism: one whose requests were all aborted is still collected,
        so that the stages stay in step)."""
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    @property
    def num_prompt_tokens(self) -> int:
        return self.scheduler.num_prompt_tokens

    @property
    def num_generation_tokens(self) -> int:
        return self.scheduler.num_generation_tokens

    def get_stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(
            num_running=len({s.request.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request.request_id for s in self.scheduler.waiting}),
            kv_cache_usage=pool.usage, num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks, prefix_cache_queries=pool.num_queries,
            prefix_cache_hits=pool.num_hits, num_preemptions=self.scheduler.num_preemptions,
            spec_decode=(dataclasses.replace(self.scheduler.spec_stats)
                         if self.scheduler.proposer is not None else None),
        )

    # ---- the step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update: the scheduler decides, the executor
        computes (and samples), the scheduler turns the result into state.

        What fails for one request (its sampling, detokenizing, forking, stop
        check) ends that request alone: its output comes back finished, with
        ``error`` set. When the step itself fails, it is run once more without
        the requests admitted in it (the likeliest cause, as everything else
        ran the step before); those fail, and only a second failure (or a
        failing step that admitted nothing) is raised, for the caller to fail
        the batch.

        Under pipeline parallelism a step starts a batch while fewer than
        ``pipeline_parallel_size`` are in flight and there is work for one,
        and otherwise finishes the oldest: a call may return no outputs."""
        if self.pipeline_depth > 1:
            return self._pipelined_step()
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return self._nothing_scheduled()
        try:
            result = self.executor.execute(sched)
        except ExecutorBrokenError:
            raise
        except Exception as exc:
            if not sched.admitted:
                raise
            sched = self._without_newest(sched, exc)
            if sched.is_empty:
                return self.scheduler.take_failed()
            result = self.executor.execute(sched)
        outputs = self.scheduler.update_from_output(sched, result)
        self.scheduler.observe_step(sched, time.perf_counter() - start)
        return outputs

    def _nothing_scheduled(self) -> list[RequestOutput]:
        """A step with nothing to run: wait a little for a grammar, or fail
        a waiting request that can never fit; the failed requests' outputs."""
        pending = self.scheduler.pending_grammars()
        if pending:
            concurrent.futures.wait(pending, timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        elif self.scheduler.waiting and not self.scheduler.running:
            self._fail_unschedulable()
        return self.scheduler.take_failed()

    def _pipelined_step(self) -> list[RequestOutput]:
        """See :meth:`step`. A failure here is the executor's, and fatal
        (the stages are out of step): no retry."""
        scheduler = self.scheduler
        if len(self.in_flight) < self.pipeline_depth:
            sched = scheduler.schedule()
            if not sched.is_empty:
                ids = {item.seq.request.request_id for item in sched.scheduled}
                scheduler.in_flight |= ids
                self.in_flight.append((sched, self.executor.submit(sched), time.perf_counter()))
                self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
                if len(self.in_flight) < self.pipeline_depth:
                    return scheduler.take_failed()
            elif not self.in_flight:
                return self._nothing_scheduled()
        sched, handle, start = self.in_flight.popleft()
        result = self.executor.collect(handle)
        scheduler.in_flight -= {item.seq.request.request_id for item in sched.scheduled}
        outputs = scheduler.update_from_output(sched, result)
        scheduler.observe_step(sched, time.perf_counter() - start)
        return outputs

    def _without_newest(self, sched: SchedulerOutput, exc: Exception) -> SchedulerOutput:
        """The step failed: fail the request it admitted, or, when it admitted
        several, send them back to wait and be admitted one per step (so a
        failure then names the one at fault); schedule the rest again."""
        newest = list({seq.request.request_id: seq.request for seq in sched.admitted}.values())
        logger.warning("a step failed (%s: %s); running it again without the %d request(s) "
                       "it admitted", type(exc).__name__, exc, len(newest))
        # The step's block copies did not run (or ran, and run again harmlessly).
        self.kv.pending_copies[:0] = sched.block_copies
        if len(newest) == 1:
            self.scheduler.fail_request(newest[0], f"the step that admitted it failed: "
                                                   f"{type(exc).__name__}: {exc}")
        else:
            self.scheduler.requeue_as_suspects(sched.admitted)
        return self.scheduler.schedule(admit=False)

    def _fail_unschedulable(self) -> None:
        # A beam holding its proposals is never the one that needs blocks.
        seq = next((s for s in self.scheduler.waiting if s.candidates is None),
                   self.scheduler.waiting[0])
        self.scheduler.fail_request(
            seq.request, f"it needs more KV-cache blocks than exist ({self.kv.num_total_blocks}); "
                         f"raise --kv-cache-memory")
