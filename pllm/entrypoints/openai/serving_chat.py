"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pllm.core.outputs import CompletionOutput
from pllm.entrypoints.openai.errors import bad_request
from pllm.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from pllm.entrypoints.openai.serving import (
    SSE_DONE,
    ClientDisconnected,
    ServingContext,
    abort_unfinished,
    chat_logprobs,
    collect_final,
    sampling_params,
    sse,
    sse_error,
    structured_outputs,
)


def _flatten(message: ChatMessage, index: int) -> dict:
    """Content parts -> text (pllm serves text-only models)."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}]: only text content parts are supported, "
                                  f"got type {part.get('type')!r}", "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    msg = {"role": message.role, "content": content or ""}
    if message.name:
        msg["name"] = message.name
    return msg


async def render_chat_prompt(ctx: ServingContext, messages: list[ChatMessage],
                             add_generation_prompt: bool) -> dict:
    """The engine's prompt form ``{"prompt", "prompt_token_ids"}``, rendered
    and tokenized by the engine (as ``LLM.chat`` does), off the event loop."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    flat = [_flatten(m, i) for i, m in enumerate(messages)]
    ctx.check_text_length("".join(m["content"] for m in flat), "messages")
    try:
        text, ids = await ctx.run_off_loop(ctx.engine.render_chat, flat, add_generation_prompt)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    return {"prompt": text, "prompt_token_ids": ids}


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported", "tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


async def _structured(ctx: ServingContext, req: ChatCompletionRequest):
    """``response_format`` (OpenAI's; ``json_schema`` is held to its schema,
    ``json_object`` to any JSON object), or vLLM's ``structured_outputs``."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return await structured_outputs(ctx, req.structured_outputs)
    if req.structured_outputs is not None:
        raise bad_request("give response_format or structured_outputs, not both", "response_format")
    if fmt.type == "json_object":
        return await structured_outputs(ctx, {"json_object": True}, "response_format")
    if fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              "response_format")
        return await structured_outputs(ctx, {"json": schema}, "response_format")
    raise bad_request(f"response_format type {fmt.type!r} is not one of text, json_object, "
                      "json_schema", "response_format")


def _choice_logprobs(ctx: ServingContext, req: ChatCompletionRequest, comp: CompletionOutput,
                     start: int) -> ChatChoiceLogprobs | None:
    if not req.logprobs:
        return None
    content = chat_logprobs(ctx, comp.token_ids[start:], (comp.logprobs or [])[start:],
                            req.top_logprobs or 0)
    return ChatChoiceLogprobs(content=content)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest,
                                 raw_request: Request) -> Response:
    ctx.check_model(req.model)
    _check_unsupported(req)
    ctx.check_capacity()
    prompt = await render_chat_prompt(ctx, req.messages, req.add_generation_prompt)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             structured=await _structured(ctx, req))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await ctx.add_all(request_id, [prompt], params, "messages")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(ctx, req, request_id, streams, include_usage),
                                 media_type="text/event-stream")
    try:
        (out,) = await collect_final(ctx, streams, raw_request)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = [
        ChatCompletionResponseChoice(
            index=comp.index,
            message=ChatResponseMessage(content=comp.text),
            logprobs=_choice_logprobs(ctx, req, comp, 0),
            finish_reason=comp.finish_reason,
            stop_reason=comp.stop_reason,
        )
        for comp in sorted(out.outputs, key=lambda c: c.index)
    ]
    num_generated = sum(len(c.token_ids) for c in out.outputs)
    usage = UsageInfo(prompt_tokens=len(out.prompt_token_ids), completion_tokens=num_generated,
                      total_tokens=len(out.prompt_token_ids) + num_generated)
    response = ChatCompletionResponse(id=request_id, model=ctx.model_name, choices=choices,
                                      usage=usage)
    return JSONResponse(response.model_dump())


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, request_id: str,
                  streams: list, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionStreamResponse(id=request_id, model=ctx.model_name,
                                                choices=choices, usage=usage))

    sent_chars = [0] * req.n
    sent_tokens = [0] * req.n
    done = [False] * req.n
    last = None
    try:
        # The role comes first, before any token, as OpenAI sends it.
        yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                           content=""))
                     for i in range(req.n)])
        async for out in streams[0]:
            last = out
            choices = []
            for comp in out.outputs:
                i = comp.index
                if done[i] or len(comp.text) < sent_chars[i]:
                    continue
                delta = comp.text[sent_chars[i]:]
                if not delta and not comp.finish_reason:
                    continue
                choices.append(ChatCompletionStreamChoice(
                    index=i, delta=DeltaMessage(content=delta) if delta else DeltaMessage(),
                    logprobs=_choice_logprobs(ctx, req, comp, sent_tokens[i]),
                    finish_reason=comp.finish_reason,
                ))
                sent_chars[i], sent_tokens[i] = len(comp.text), len(comp.token_ids)
                done[i] = comp.finish_reason is not None
            if choices:
                yield chunk(choices)
        if include_usage and last is not None:
            generated = sum(len(c.token_ids) for c in last.outputs)
            prompt = len(last.prompt_token_ids)
            yield chunk([], UsageInfo(prompt_tokens=prompt, completion_tokens=generated,
                                      total_tokens=prompt + generated))
    except Exception as exc:  # noqa: BLE001 - the status line is already sent
        yield sse_error(exc)
    finally:
        abort_unfinished(ctx, streams)
    yield SSE_DONE
