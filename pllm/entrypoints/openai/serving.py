"""What the completions and chat handlers share: the serving context, sampling
parameters from a request, logprob shapes, SSE framing and stream merging."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from pllm.core.outputs import Logprob, LogprobsDict, RequestOutput
from pllm.core.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from pllm.core.structured import check as check_grammar
from pllm.entrypoints.openai.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from pllm.entrypoints.openai.errors import (
    OpenAIError,
    bad_request,
    error_response,
    from_value_error,
)
from pllm.entrypoints.openai.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

# OpenAI's stand-in for a logprob of -inf (JSON has no infinities).
_MIN_LOGPROB = -9999.0


class ClientDisconnected(Exception):
    """The client went away before a non-streaming response was ready."""


@dataclass
class ServingContext:
    async_engine: AsyncLLMEngine
    model_name: str
    max_model_len: int
    tokenizer: Any
    engine: Any  # tokenize / render_chat (read-only, safe off the engine thread)
    max_num_seqs: int  # a request's n choices must fit one batch
    max_waiting_requests: int | None = None  # beyond it, new requests get a 503
    tool_parser: str | None = None  # --tool-call-parser
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    _token_text: dict[int, str] = field(default_factory=dict)
    # Tokenizing and chat templating run here, never on the event loop: a long
    # prompt must not stall every other stream and /health. One thread, as
    # the tokenizer is shared with the engine thread (which only decodes).
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="pllm-tokenize"))
    _max_token_chars: int = 0

    def __post_init__(self) -> None:
        # The longest piece in the vocabulary: a token covers at most this many
        # characters of text (byte-level pieces spell one byte per character,
        # and a character is at least one byte), so text longer than twice
        # (normalizers may fold characters) this times the context cannot fit.
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self._max_token_chars = max((len(piece) for piece in vocab), default=0)

    async def run_off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_text_length(self, text: str, param: str) -> None:
        """Refuse text that cannot fit the context, by its length alone,
        before any time is spent tokenizing it."""
        if self._max_token_chars and len(text) > 2 * self._max_token_chars * self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"{param} is {len(text)} characters, more than that many tokens can hold.", param)

    def check_capacity(self) -> None:
        """``--max-waiting-requests``: a 503 with Retry-After once the queue is full."""
        limit = self.max_waiting_requests
        if limit is not None and self.async_engine.num_waiting >= limit:
            raise OpenAIError(503, f"the server is at capacity ({limit} requests waiting); "
                                   "retry later", headers={"Retry-After": "1"})

    async def tokenize(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        self.check_text_length(text, param)
        try:
            return await self.run_off_loop(self.engine.tokenize, text, add_special_tokens)
        except ValueError as exc:
            raise from_value_error(exc, param) from exc

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves "
                                   f"`{self.model_name}`.", "model")

    def token_text(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range [0, {vocab})", param)

    def check_context(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        """As vLLM's server: a prompt plus the tokens asked for must fit the
        context (the offline API instead stops at the limit with "length")."""
        num_prompt = len(prompt_ids)
        if num_prompt + max_tokens > self.max_model_len:
            where = "messages" if param == "messages" else "prompt"
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the {where}, "
                f"{max_tokens} in the completion). Please reduce the length of the {where} "
                f"or completion.", param)

    async def add_all(self, request_id: str, prompts: list[str | list[int] | dict],
                      params: SamplingParams, param: str) -> list[RequestStream]:
        """Add one engine request per prompt (ids ``{request_id}-{i}``); all or none.
        Text is tokenized once, here (by the engine's ``tokenize``), and the ids
        travel with it."""
        if params.n > self.max_num_seqs:
            raise bad_request(f"n must be <= {self.max_num_seqs} (--max-num-seqs), got {params.n}",
                              "n")
        self.check_capacity()
        for p in prompts:
            if isinstance(p, str):
                self.check_text_length(p, param)
        prompts = [{"prompt": p, "prompt_token_ids": await self.tokenize(p, param)}
                   if isinstance(p, str) else p for p in prompts]
        if params.max_tokens is not None:
            for prompt in prompts:
                ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
                self.check_context(ids, params.max_tokens, param)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(
            *(self.async_engine.add_request(rid, p, params) for rid, p in zip(ids, prompts)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.async_engine.abort([rid for rid, r in zip(ids, results)
                                     if not isinstance(r, BaseException)])
            if isinstance(errors[0], ValueError):
                error = from_value_error(errors[0], param)
                if error.param == "prompt":  # the engine's name for what chat calls messages
                    error.param = param
                raise error
            raise errors[0]
        return list(results)  # type: ignore[arg-type]


async def structured_outputs(ctx: ServingContext, value: dict | None,
                             param: str = "structured_outputs") -> StructuredOutputsParams | None:
    """vLLM's ``structured_outputs`` body field (or what ``response_format``
    maps to), checked here, off the event loop (a JSON schema is parsed):
    a 400 naming ``param`` when it does not parse."""
    if value is None:
        return None
    try:
        params = StructuredOutputsParams(**value) if isinstance(value, dict) else value
        await ctx.run_off_loop(check_grammar, params)
    except TypeError as exc:
        raise bad_request(f"{param}: {exc}", param) from exc
    except SamplingParamsError as exc:
        raise bad_request(str(exc).replace("structured_outputs", param, 1), param) from exc
    return params


def sampling_params(req: Any, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None,
                    structured: StructuredOutputsParams | None = None) -> SamplingParams:
    bias = None
    if req.logit_bias:  # OpenAI sends the token ids as JSON object keys: text
        try:
            bias = {int(token): value for token, value in req.logit_bias.items()}
        except (TypeError, ValueError):
            raise bad_request("logit_bias keys must be token ids", "logit_bias") from None
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=structured,
            logit_bias=bias,
        )
    except SamplingParamsError as exc:
        raise from_value_error(exc) from exc


def _clamp(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def _ranked(lp: LogprobsDict) -> list[tuple[int, Logprob]]:
    return sorted(lp.items(), key=lambda kv: -kv[1].logprob)


def completion_logprobs(ctx: ServingContext, token_ids: list[int],
                        logprobs: list[LogprobsDict | None], top_k: int,
                        offset: int) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy shape; returns it and the text offset after the last token."""
    out = CompletionLogprobs()
    for token_id, lp in zip(token_ids, logprobs):
        chosen = lp.get(token_id) if lp else None
        text = ctx.token_text(token_id, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(_clamp(chosen.logprob) if chosen else None)
        if lp is None:
            out.top_logprobs.append(None)
        else:
            top = {ctx.token_text(t, p): _clamp(p.logprob) for t, p in _ranked(lp)[:top_k]}
            if chosen is not None:
                top.setdefault(text, _clamp(chosen.logprob))
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(ctx: ServingContext, token_ids: list[int],
                  logprobs: list[LogprobsDict], top_k: int) -> list[ChatTokenLogprob]:
    content = []
    for token_id, lp in zip(token_ids, logprobs):
        chosen = lp.get(token_id)
        text = ctx.token_text(token_id, chosen)
        content.append(ChatTokenLogprob(
            token=text,
            logprob=_clamp(chosen.logprob) if chosen else _MIN_LOGPROB,
            bytes=list(text.encode("utf-8")),
            top_logprobs=[
                TopLogprob(token=(t_text := ctx.token_text(t, p)), logprob=_clamp(p.logprob),
                           bytes=list(t_text.encode("utf-8")))
                for t, p in _ranked(lp)[:top_k]
            ],
        ))
    return content


def sse(chunk: BaseModel | dict) -> str:
    if isinstance(chunk, BaseModel):
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(chunk)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: Exception) -> str:
    """An error after the stream began (its status line is sent): an event in OpenAI's shape."""
    if isinstance(exc, OpenAIError):
        err = exc.to_response()
    elif isinstance(exc, EngineDeadError):
        err = error_response(503, str(exc))
    else:
        err = error_response(500, f"{type(exc).__name__}: {exc}")
    return sse(err.model_dump())


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as outputs arrive: yields (stream index, output)."""
    pending = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
                yield i, out
    finally:
        for fut in pending:
            fut.cancel()


def abort_unfinished(ctx: ServingContext, streams: list[RequestStream]) -> None:
    ids = [s.request_id for s in streams if not s.finished]
    if ids:
        ctx.async_engine.abort(ids)


async def collect_final(ctx: ServingContext, streams: list[RequestStream],
                        raw_request: Request) -> list[RequestOutput]:
    """Wait for every stream to finish; abort them if the client disconnects meanwhile."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        async for i, out in merge_streams(streams):
            finals[i] = out

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                task.result()
                break
            if await raw_request.is_disconnected():
                task.cancel()
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
        abort_unfinished(ctx, streams)
    if any(f is None or not f.finished for f in finals):
        raise OpenAIError(503, "the request was aborted before it finished")
    return finals  # type: ignore[return-value]
