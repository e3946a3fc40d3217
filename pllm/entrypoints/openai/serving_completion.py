"""POST /v1/completions: prompts as text, lists of text, token ids or lists of token ids.

Each prompt is one engine request; its ``n`` choices get the indices
``prompt_index * n + i`` in the response, as OpenAI numbers them.
``echo`` with ``max_tokens`` 0 scores a prompt: its text and, with
``logprobs``, its tokens' logprobs, and no completion.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pllm.core.outputs import CompletionOutput, RequestOutput
from pllm.entrypoints.openai.errors import bad_request
from pllm.entrypoints.openai.protocol import (
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from pllm.entrypoints.openai.serving import (
    SSE_DONE,
    ClientDisconnected,
    ServingContext,
    abort_unfinished,
    collect_final,
    completion_logprobs,
    merge_streams,
    sampling_params,
    sse,
    sse_error,
    structured_outputs,
)


def _normalize_prompts(ctx: ServingContext, prompt: object) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):  # type: ignore[union-attr]
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    for p in prompts:
        if len(p) == 0:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(p, list):
            ctx.check_token_ids(p, "prompt")
    return prompts


def _prompt_text(ctx: ServingContext, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt)


class _Choice:
    """Per-choice bookkeeping: what was already sent (streaming) and the echo prefix."""

    def __init__(self, echo_text: str) -> None:
        self.echo_text = echo_text
        self.num_chars = 0
        self.num_tokens = 0
        self.offset = len(echo_text)
        self.started = False
        self.done = False


def _logprobs_for(ctx: ServingContext, req: CompletionRequest, out: RequestOutput,
                  comp: CompletionOutput, state: _Choice,
                  start_token: int) -> CompletionLogprobs | None:
    if req.logprobs is None:
        return None
    ids, lps = comp.token_ids[start_token:], (comp.logprobs or [])[start_token:]
    result = CompletionLogprobs()
    if req.echo and not state.started:
        prompt_lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        result, _ = completion_logprobs(ctx, out.prompt_token_ids, prompt_lps, req.logprobs, 0)
    gen, state.offset = completion_logprobs(ctx, ids, lps, req.logprobs, state.offset)
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(result, name).extend(getattr(gen, name))
    return result


async def create_completion(ctx: ServingContext, req: CompletionRequest,
                            raw_request: Request) -> Response:
    ctx.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    best_of = req.n if req.best_of is None else req.best_of
    if best_of < req.n:
        raise bad_request(f"best_of ({best_of}) must be >= n ({req.n})", "best_of")
    if best_of > req.n and req.stream:
        raise bad_request("best_of > n cannot stream: the best are known at the end", "best_of")
    prompt_only = req.max_tokens == 0
    if prompt_only and not req.echo:
        raise bad_request("max_tokens must be >= 1 (0 only with echo, to score the prompt)",
                          "max_tokens")
    if prompt_only and req.min_tokens:
        raise bad_request("min_tokens must be 0 with max_tokens 0", "min_tokens")
    prompts = _normalize_prompts(ctx, req.prompt)
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    # best_of > n ranks the samples by their logprob per token: each needs its own.
    logprobs = req.logprobs if req.logprobs is not None or best_of == req.n else 0
    # A prompt is scored by the pass that samples its first token (then dropped).
    params = sampling_params(req, max_tokens=1 if prompt_only else req.max_tokens,
                             logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs,
                             structured=await structured_outputs(ctx, req.structured_outputs))
    if best_of > req.n:
        params = dataclasses.replace(params, n=best_of)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await ctx.add_all(request_id, prompts, params, "prompt")
    echo = [_prompt_text(ctx, p) if req.echo else "" for p in prompts]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(ctx, req, request_id, streams, echo, include_usage, prompt_only),
            media_type="text/event-stream",
        )
    try:
        finals = await collect_final(ctx, streams, raw_request)
    except ClientDisconnected:
        return Response(status_code=499)
    if prompt_only:
        finals = [_prompt_only(out) for out in finals]
    choices = []
    for p, out in enumerate(finals):
        for rank, comp in enumerate(_best(out.outputs, req.n)):
            state = _Choice(echo[p])
            choices.append(CompletionResponseChoice(
                index=p * req.n + rank,
                text=echo[p] + comp.text,
                logprobs=_logprobs_for(ctx, req, out, comp, state, 0),
                finish_reason=comp.finish_reason,
                stop_reason=comp.stop_reason,
            ))
    response = CompletionResponse(id=request_id, model=ctx.model_name,
                                  choices=sorted(choices, key=lambda c: c.index),
                                  usage=_usage(finals))
    return JSONResponse(response.model_dump())


def _prompt_only(out: RequestOutput) -> RequestOutput:
    """``out`` without the token sampled to score its prompt (``max_tokens`` 0)."""
    if not out.finished:
        return dataclasses.replace(out, outputs=[])
    return dataclasses.replace(out, outputs=[
        dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                            cumulative_logprob=None if c.cumulative_logprob is None else 0.0,
                            finish_reason="length" if c.finish_reason != "abort" else "abort",
                            stop_reason=None)
        for c in out.outputs])


def _best(samples: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The ``n`` samples of highest log probability per token (OpenAI's
    best_of), in that order; all of them, in their own order, when there are
    only ``n``."""
    if len(samples) <= n:
        return sorted(samples, key=lambda c: c.index)
    return sorted(samples, key=lambda c: -(c.cumulative_logprob or 0.0)
                  / max(len(c.token_ids), 1))[:n]


def _usage(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


async def _stream(ctx: ServingContext, req: CompletionRequest, request_id: str,
                  streams: list, echo: list[str], include_usage: bool,
                  prompt_only: bool) -> AsyncIterator[str]:
    states: dict[int, _Choice] = {}
    latest: dict[int, RequestOutput] = {}
    try:
        async for p, out in merge_streams(streams):
            if prompt_only:
                out = _prompt_only(out)
            latest[p] = out
            choices = []
            for comp in out.outputs:
                index = p * req.n + comp.index
                state = states.setdefault(index, _Choice(echo[p]))
                if state.done or len(comp.text) < state.num_chars:
                    continue
                delta = comp.text[state.num_chars:]
                if not delta and not comp.finish_reason and state.started:
                    continue
                logprobs = _logprobs_for(ctx, req, out, comp, state, state.num_tokens)
                text = delta if state.started else state.echo_text + delta
                state.started, state.done = True, comp.finish_reason is not None
                state.num_chars, state.num_tokens = len(comp.text), len(comp.token_ids)
                choices.append(CompletionResponseChoice(
                    index=index, text=text, logprobs=logprobs,
                    finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                ))
            if choices:
                yield sse(CompletionStreamResponse(id=request_id, model=ctx.model_name,
                                                   choices=choices))
        if include_usage:
            usage = _usage([latest[p] for p in sorted(latest)])
            yield sse(CompletionStreamResponse(id=request_id, model=ctx.model_name, choices=[],
                                               usage=usage))
    except Exception as exc:  # noqa: BLE001 - the status line is already sent
        yield sse_error(exc)
    finally:
        abort_unfinished(ctx, streams)
    yield SSE_DONE
