"""The OpenAI-compatible HTTP server: a FastAPI app around one AsyncLLMEngine.

Routes under ``/v1`` need ``Authorization: Bearer <key>`` when an API key is
set; ``/health``, ``/version``, ``/metrics``, ``/tokenize`` and ``/detokenize``
never do (as in vLLM).
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
from pllm.entrypoints.openai.async_engine import AsyncLLMEngine, EngineDeadError
from pllm.entrypoints.openai.errors import OpenAIError, error_response, install_error_handlers
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


def build_app(engine: Any, *, api_key: str | None = None,
              should_exit: Callable[[], bool] | None = None,
              shutdown_timeout: float = 10.0) -> FastAPI:
    """An app serving ``engine`` (an LLMEngine); its engine thread runs during the lifespan.

    ``should_exit`` tells when the HTTP server began a graceful shutdown; the
    requests still in flight ``shutdown_timeout`` seconds later are aborted
    (streams end with an error event and ``[DONE]``, others get a 503).
    """
    metrics = ServerMetrics(engine.model_name)
    async_engine = AsyncLLMEngine(engine, observer=metrics)
    ctx = ServingContext(async_engine=async_engine, model_name=engine.model_name,
                         max_model_len=engine.max_model_len, tokenizer=engine.tokenizer,
                         engine=engine, max_num_seqs=engine.config.scheduler.max_num_seqs)

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
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return JSONResponse(error_response(503, str(exc)).model_dump(), status_code=503)

    app.include_router(_v1_router(ctx, api_key))
    app.include_router(_ops_router(ctx, metrics))
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


def _v1_router(ctx: ServingContext, api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth_dependency(api_key))])

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


def _ops_router(ctx: ServingContext, metrics: ServerMetrics) -> APIRouter:
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

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            ids = render_chat_prompt(ctx, req.messages, req.add_generation_prompt)["prompt_token_ids"]
        else:
            ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len)

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens))

    return router
