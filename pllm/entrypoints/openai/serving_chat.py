"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request.

Tools: the template is given the request's ``tools``; with ``tool_choice``
``auto`` the server's ``--tool-call-parser`` reads calls out of the text;
``required`` holds the output by a grammar to a JSON array of calls of the
tools given, and a named function to that function's arguments, so that
they always parse (pllm.entrypoints.openai.tool_parsers).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

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
    FunctionCall,
    ToolCall,
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
from pllm.entrypoints.openai.tool_parsers import (
    CallArrayParser,
    NamedCallParser,
    ToolCallStream,
    ToolParser,
    final_calls,
    get_tool_parser,
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
    msg: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name:
        msg["name"] = message.name
    if message.tool_call_id is not None:
        msg["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        msg["tool_calls"] = [_template_call(call, index) for call in message.tool_calls]
    return msg


def _template_call(call: dict, index: int) -> dict:
    """An assistant turn's call as chat templates read it: its arguments as
    an object (templates write them with ``tojson``), not OpenAI's JSON text."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"messages[{index}].tool_calls: each call needs a function with a "
                          "name", "messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # as written: the template shows the text
    out = dict(call)
    out["function"] = {**function, "arguments": arguments}
    # Some templates read name and arguments at the top level of a call.
    out.setdefault("name", function["name"])
    out.setdefault("arguments", arguments)
    return out


async def render_chat_prompt(ctx: ServingContext, messages: list[ChatMessage],
                             add_generation_prompt: bool, tools: list[dict] | None = None) -> dict:
    """The engine's prompt form ``{"prompt", "prompt_token_ids"}``, rendered
    and tokenized by the engine (as ``LLM.chat`` does), off the event loop."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    flat = [_flatten(m, i) for i, m in enumerate(messages)]
    ctx.check_text_length("".join(m["content"] for m in flat) + json.dumps(tools or []),
                          "messages")
    try:
        text, ids = await ctx.run_off_loop(ctx.engine.render_chat, flat, add_generation_prompt,
                                           tools)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    return {"prompt": text, "prompt_token_ids": ids}


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


@dataclasses.dataclass
class _ToolPlan:
    tools: list[dict] | None = None  # for the chat template
    parser: ToolParser | None = None  # None: the output is content only
    structured: dict | None = None  # the grammar of required / a named function
    max_calls: int | None = None  # 1 with parallel_tool_calls false


def _function_name(tool: Any, index: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    if (not isinstance(tool, dict) or tool.get("type", "function") != "function"
            or not isinstance(function, dict)):
        raise bad_request(f"tools[{index}] must be {{\"type\": \"function\", \"function\": "
                          "{\"name\": ..., \"parameters\": {...}}}", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"tools[{index}].function.name must be a non-empty string", "tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"tools[{index}].function.parameters must be a JSON schema object",
                          "tools")
    return name


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _lift_definitions(parameters: dict, definitions: dict[str, dict], tool: str) -> dict:
    """``parameters`` without its ``$defs`` / ``definitions``, which go to
    ``definitions`` (the root of the schema it is nested in: a reference
    like ``#/$defs/Place`` points at the root); the same name defined two
    ways by two tools is a 400."""
    parameters = dict(parameters)
    for key in ("$defs", "definitions"):
        defs = parameters.pop(key, None)
        if not isinstance(defs, dict):
            continue
        merged = definitions.setdefault(key, {})
        for name, definition in defs.items():
            if merged.setdefault(name, definition) != definition:
                raise bad_request(f"tools: {key}/{name} of {tool!r} differs from another tool's "
                                  "definition of that name", "tools")
    return parameters


def _tool_plan(ctx: ServingContext, req: ChatCompletionRequest) -> _ToolPlan:
    """What ``tools`` and ``tool_choice`` ask for (OpenAI's rules; ``auto``,
    as in vLLM, needs the server started with ``--enable-auto-tool-choice``
    and a ``--tool-call-parser``)."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return _ToolPlan()
    names = [_function_name(tool, i) for i, tool in enumerate(tools)]
    max_calls = 1 if req.parallel_tool_calls is False else None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise bad_request('tool_choice must be "none", "auto", "required" or {"type": '
                              '"function", "function": {"name": ...}}', "tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                              f"({', '.join(names)})", "tool_choice")
        tool = tools[names.index(name)]
        return _ToolPlan(tools, NamedCallParser(name), {"json": _parameters(tool)})
    if choice == "none":
        return _ToolPlan(tools)
    if choice == "auto":
        if ctx.tool_parser is None or not ctx.enable_auto_tool_choice:
            raise bad_request('"auto" tool choice needs the server started with '
                              "--enable-auto-tool-choice and --tool-call-parser", "tool_choice")
        return _ToolPlan(tools, get_tool_parser(ctx.tool_parser), max_calls=max_calls)
    if choice == "required":
        definitions: dict[str, dict] = {}
        calls = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [name]},
                                 "parameters": _lift_definitions(_parameters(tool), definitions,
                                                                 name)},
                  "required": ["name", "parameters"]}
                 for name, tool in zip(names, tools)]
        schema = {"type": "array", "minItems": 1,
                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        for key, defs in definitions.items():
            schema[key] = defs
        if max_calls is not None:
            schema["maxItems"] = max_calls
        return _ToolPlan(tools, CallArrayParser(), {"json": schema})
    raise bad_request(f'tool_choice {choice!r} is not "none", "auto", "required" or a named '
                      "function", "tool_choice")


async def _structured(ctx: ServingContext, req: ChatCompletionRequest, plan: _ToolPlan):
    """``response_format`` (OpenAI's; ``json_schema`` is held to its schema,
    ``json_object`` to any JSON object), or vLLM's ``structured_outputs``,
    or the grammar of a required or named tool call."""
    fmt = req.response_format
    if plan.structured is not None:
        if req.structured_outputs is not None or (fmt is not None and fmt.type != "text"):
            raise bad_request("a required or named tool_choice cannot be combined with "
                              "response_format or structured_outputs", "tool_choice")
        return await structured_outputs(ctx, plan.structured, "tools")
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
    plan = _tool_plan(ctx, req)
    structured = await _structured(ctx, req, plan)
    prompt = await render_chat_prompt(ctx, req.messages, req.add_generation_prompt, plan.tools)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             structured=structured)
    if plan.parser is not None and plan.structured is None:
        # Tool-call markers are often special tokens (<tool_call>, <|python_tag|>).
        params = dataclasses.replace(params, skip_special_tokens=False)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await ctx.add_all(request_id, [prompt], params, "messages")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(ctx, req, request_id, streams, include_usage, plan),
                                 media_type="text/event-stream")
    try:
        (out,) = await collect_final(ctx, streams, raw_request)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = [
        ChatCompletionResponseChoice(
            index=comp.index,
            message=(message := _message(plan, comp)),
            logprobs=_choice_logprobs(ctx, req, comp, 0),
            finish_reason=_finish_reason(plan, comp.finish_reason, bool(message.tool_calls)),
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


def _message(plan: _ToolPlan, comp: CompletionOutput) -> ChatResponseMessage:
    if plan.parser is None:
        return ChatResponseMessage(content=comp.text)
    found = final_calls(plan.parser, comp.text, plan.max_calls)
    return ChatResponseMessage(
        content=found.content,
        tool_calls=[ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))
                    for call_id, name, arguments in found.calls])


def _finish_reason(plan: _ToolPlan, reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` for a choice that ended by calling tools of
    its own choice (``auto``, ``required``); a named function's call ends
    with ``stop``, as OpenAI's."""
    named = isinstance(plan.parser, NamedCallParser)
    return "tool_calls" if called and reason == "stop" and not named else reason


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, request_id: str,
                  streams: list, include_usage: bool, plan: _ToolPlan) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionStreamResponse(id=request_id, model=ctx.model_name,
                                                choices=choices, usage=usage))

    sent_chars = [0] * req.n
    sent_tokens = [0] * req.n
    done = [False] * req.n
    tool_streams = [ToolCallStream(plan.parser, plan.max_calls) if plan.parser else None
                    for _ in range(req.n)]
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
                finish = comp.finish_reason
                tools = tool_streams[i]
                if tools is None:
                    delta, calls = comp.text[sent_chars[i]:], []
                else:
                    delta, calls = tools.update(comp.text, finished=finish is not None)
                    finish = _finish_reason(plan, finish, bool(tools.ids))
                if not delta and not calls and not finish:
                    continue  # nothing to show yet: its tokens' logprobs go with the next chunk
                choices.append(ChatCompletionStreamChoice(
                    index=i, delta=DeltaMessage(content=delta or None, tool_calls=calls or None),
                    logprobs=_choice_logprobs(ctx, req, comp, sent_tokens[i]),
                    finish_reason=finish,
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
