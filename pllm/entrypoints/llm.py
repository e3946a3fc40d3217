"""The offline Python API, as vLLM's: ``LLM(model).generate(prompts, SamplingParams())``,
``LLM(model).beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=16))``."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Sequence as Seq

from tqdm.auto import tqdm

from pllm.core.engine import LLMEngine
from pllm.core.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from pllm.core.sampling_params import BeamSearchParams, SamplingParams
from pllm.entrypoints.engine_args import EngineArgs

PromptType = str | list[int] | dict
logger = logging.getLogger("pllm")


class LLM:
    """Loads a model once and runs batches of prompts through the engine.

    ``model`` is a model folder, a ``.gguf`` file, or ``None`` for the default
    model; every other keyword is an :class:`EngineArgs` field (``device``,
    ``dtype``, ``max_model_len``, ``block_size``, ``kv_cache_memory``,
    ``enable_prefix_caching``, ``max_num_seqs``, ``max_num_batched_tokens``, ...).
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's worker processes (with ``tensor_parallel_size``
        above 1); also done at interpreter exit."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in input order. ``prompts``: strings, token-id lists, or
        ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}`` dicts. A request
        that failed on its own comes back finished with "abort" and its
        ``error`` set (and logged); the others are unaffected."""
        items = self._normalize(prompts, prompt_token_ids)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(items)} prompts; pass one or one per prompt"
                )
        return self._run(self._add_requests(items, params), use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Seq[PromptType],
        params: BeamSearchParams,
        *,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (see :class:`BeamSearchParams`), in the engine:
        a prompt's beams are sequences of one request that share their
        blocks. Per prompt, in input order, the best ``beam_width``
        hypotheses, best first; each one's ``tokens`` are the prompt's and
        the generated ones, its ``text`` all of them decoded (as vLLM's)."""
        items = self._normalize(prompts, None)
        outs = self._run(self._add_requests(items, [params.to_sampling_params()] * len(items)),
                         use_tqdm)
        tokenizer = self.get_tokenizer()
        results = []
        for out in outs:
            sequences = []
            for c in out.outputs:
                tokens = list(out.prompt_token_ids) + c.token_ids
                sequences.append(BeamSearchSequence(
                    tokens=tokens, logprobs=c.logprobs, cum_logprob=c.cumulative_logprob,
                    text=tokenizer.decode(tokens), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason))
            results.append(BeamSearchOutput(sequences))
        return results

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of ``{"role", "content"}``) or a list of
        them. ``tools`` (OpenAI's function definitions) are given to the chat
        template, for a template that shows them to the model."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text, ids = self.llm_engine.render_chat(conversation, add_generation_prompt, tools)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _normalize(prompts, prompt_token_ids) -> list[str | list[int] | dict]:
        if prompt_token_ids is not None:
            return [list(p) for p in prompt_token_ids]
        if prompts is None:
            raise ValueError("pass prompts (strings or token ids)")
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        return list(prompts)  # text, ids, or {"prompt", "prompt_token_ids"}: the engine's forms

    def _add_requests(self, items: list, params: list[SamplingParams]) -> list[str]:
        """Add one request per prompt; their ids. One that is refused aborts
        those added before it."""
        ids = []
        engine = self.llm_engine
        try:
            for item, p in zip(items, params):
                rid = str(next(self._ids))
                engine.add_request(rid, item, p)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start = time.perf_counter()
        num_in = num_out = 0
        try:
            while pending:
                for out in engine.step():
                    if out.error is not None and out.request_id in pending:
                        logger.error("request %s failed: %s", out.request_id, out.error)
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finished[out.request_id] = out
                        num_in += len(out.prompt_token_ids)
                        num_out += sum(len(o.token_ids) for o in out.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(
                            f"input: {num_in / elapsed:.1f} toks/s, output: {num_out / elapsed:.1f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]
