"""The OpenAI-compatible HTTP server: a FastAPI app around one AsyncLLMEngine.

Routes under ``/v1``, ``/tokenize`` and ``/detokenize`` need ``Authorization:
Bearer <key>`` when an API key is set; ``/health``, ``/version`` and
``/metrics`` never do.

A request body over ``max_request_body_bytes`` gets a 413 before it is read;
text is tokenized and chat templates rendered off the event loop (text that
cannot fit the context is refused by its length first), so no request stalls
``/health`` or the other streams; beyond ``max_waiting_requests`` requests
waiting for the engine, new ones get a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pllm
from pllm.entrypoints.openai.async_engine import AsyncLLMEngine, EngineDeadError, EngineThread
from pllm.entrypoints.openai.errors import (
    BodyLimit,
    OpenAIError,
    error_response,
    install_error_handlers,
)
from pllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from pllm.entrypoints.openai.serving import ServingContext
from pllm.entrypoints.openai.serving_chat import create_chat_completion, render_chat_prompt
from pllm.entrypoints.openai.serving_completion import create_completion

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 2**20


def build_app(engine: Any, *, api_key: str | None = None,
              should_exit: Callable[[], bool] | None = None,
              shutdown_timeout: float = 10.0,
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
              max_waiting_requests: int | None = None,
              tool_call_parser: str | None = None,
              enable_auto_tool_choice: bool = False,
              engine_thread: EngineThread | None = None) -> FastAPI:
    """An app serving ``engine`` (an LLMEngine); its engine thread (``engine_thread``,
    the one that built it, if given) runs during the lifespan.

    ``should_exit`` tells when the HTTP server began a graceful shutdown; the
    requests still in flight ``shutdown_timeout`` seconds later are aborted
    (streams end with an error event and ``[DONE]``, others get a 503).
    """
    metrics = ServerMetrics(engine.model_name)
    async_engine = AsyncLLMEngine(engine, observer=metrics, thread=engine_thread)
    ctx = ServingContext(async_engine=async_engine, model_name=engine.model_name,
                         max_model_len=engine.max_model_len, tokenizer=engine.tokenizer,
                         engine=engine, max_num_seqs=engine.config.scheduler.max_num_seqs,
                         max_waiting_requests=max_waiting_requests,
                         tool_parser=tool_call_parser,
                         enable_auto_tool_choice=enable_auto_tool_choice)
    if tool_call_parser and not engine.chat_template_renders_tools:
        logger.warning("the chat template does not render tools: the model is not told which "
                       "tools it has; pass a --chat-template that does (such as the repository's "
                       "examples/tool_chat_template_chatml_hermes.jinja for ChatML models)")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async_engine.start()
        drain = asyncio.create_task(_abort_after_grace(async_engine, should_exit,
                                                       shutdown_timeout)) if should_exit else None
        try:
            yield
        finally:
            if drain is not None:
                drain.cancel()
            await async_engine.shutdown()

    app = FastAPI(title="pllm OpenAI-compatible server", version=pllm.__version__,
                  lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=max_request_body_bytes)
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return JSONResponse(error_response(503, str(exc)).model_dump(), status_code=503)

    auth = Depends(_auth_dependency(api_key))
    app.include_router(_v1_router(ctx, auth))
    app.include_router(_ops_router(ctx, metrics, auth))
    return app


async def _abort_after_grace(async_engine: AsyncLLMEngine, should_exit: Callable[[], bool],
                             grace: float) -> None:
    while not should_exit():
        await asyncio.sleep(0.1)
    if async_engine.num_requests:
        logger.info("shutting down: %d request(s) in flight get %.0fs to finish",
                    async_engine.num_requests, grace)
    await asyncio.sleep(grace)
    if async_engine.num_requests:
        logger.warning("aborting %d request(s) still in flight", async_engine.num_requests)
    await async_engine.shutdown()


def _auth_dependency(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise OpenAIError(401, "Incorrect or missing API key; send 'Authorization: Bearer "
                                   "<key>'.")

    return check


def _v1_router(ctx: ServingContext, auth: Any) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[auth])

    def card() -> ModelCard:
        return ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len)

    @router.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @router.get("/models/{model:path}", response_model=ModelCard)
    async def get_model(model: str) -> ModelCard:
        ctx.check_model(model)
        return card()

    @router.post("/completions")
    async def completions(req: CompletionRequest, raw_request: Request) -> Response:
        return await create_completion(ctx, req, raw_request)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw_request: Request) -> Response:
        return await create_chat_completion(ctx, req, raw_request)

    return router


def _ops_router(ctx: ServingContext, metrics: ServerMetrics, auth: Any) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not ctx.async_engine.is_running:
            return JSONResponse(error_response(503, "the engine loop is not running").model_dump(),
                                status_code=503)
        return Response(status_code=200)

    @router.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=pllm.__version__)

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @router.post("/tokenize", response_model=TokenizeResponse, dependencies=[auth])
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            prompt = await render_chat_prompt(ctx, req.messages, req.add_generation_prompt,
                                              req.tools)
            ids = prompt["prompt_token_ids"]
        else:
            ids = await ctx.tokenize(req.prompt, "prompt", req.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len)

    @router.post("/detokenize", response_model=DetokenizeResponse, dependencies=[auth])
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(req.model)
        if len(req.tokens) > ctx.max_model_len:
            raise OpenAIError(400, f"tokens: at most {ctx.max_model_len} (the context length)",
                              "tokens")
        ctx.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=await ctx.run_off_loop(ctx.tokenizer.decode, req.tokens))

    return router
