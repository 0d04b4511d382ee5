"""The OpenAI-compatible client API under /v1. Thin: decode, call one use case, encode."""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp

from fila.domain.errors import FilaError, InvalidRequest
from fila.http.auth import client_key
from fila.services.chat import parse_chat_request
from fila.services.ids import new_request_id
from fila.services.gateway import RequestContext, log_summary, log_unauthenticated

_encode = msgspec.json.Encoder().encode
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CACHE_DIRECTIVES = {"refresh": "refresh", "bypass": "bypass", "no-cache": "refresh", "no-store": "bypass"}


def _container(request: Request) -> Any:
    return request.app.state.container


def cache_directive(request: Request) -> str | None:
    header = request.headers.get("x-fila-cache")
    if header:
        directive = _CACHE_DIRECTIVES.get(header.strip().lower())
        if directive is None or header.strip().lower() not in ("refresh", "bypass"):
            raise InvalidRequest("x-fila-cache must be 'refresh' or 'bypass'", param="x-fila-cache")
        return directive
    control = request.headers.get("cache-control")
    if control:
        tokens = {part.strip().lower() for part in control.split(",")}
        if "no-store" in tokens:
            return "bypass"
        if "no-cache" in tokens:
            return "refresh"
    return None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
    return key


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request) -> ASGIApp:
    started = time.perf_counter()
    container = _container(request)
    request_id = request.headers.get("x-request-id")
    if not request_id or not _REQUEST_ID.fullmatch(request_id):   # the client's own, if it is a sane one
        request_id = new_request_id()
    request.state.request_id = request_id     # for the error mapper: a refusal carries it too
    try:
        key = await client_key(request, container)
    except FilaError as error:
        log_unauthenticated(request_id, error.status, started, error.code)
        raise
    ctx = RequestContext(key=key, request_id=request_id, started=started)
    structlog.contextvars.bind_contextvars(request_id=request_id, api_key_id=key.id)
    status, logs_itself = 500, False   # until answered: anything unforeseen is the mapper's 500
    try:
        ctx.idempotency_key, ctx.cache_directive = _idempotency_key(request), cache_directive(request)
        parsed = parse_chat_request(await request.body(), container.settings.default_model)
        if parsed.request.stream:
            reply = await container.gateway.stream(ctx, parsed)
            headers = dict(reply.headers, **{"x-request-id": request_id, "cache-control": "no-cache"})
            logs_itself = True   # the stream logs its own summary line when it ends
            return Stream(reply.frames, media_type="text/event-stream", headers=headers)
        reply = await container.gateway.complete(ctx, parsed)
        reply.headers["x-request-id"] = request_id
        status = reply.status
        logs_itself = True   # the summary line is written once the answer is sent, not before
        # the ready ASGI response: Litestar's Response would only be turned into this, ~7 us later
        return ASGIResponse(body=reply.body, status_code=reply.status, media_type="application/json",
                            headers=reply.headers, background=BackgroundTask(log_summary, ctx, status))
    except FilaError as error:
        status = error.status
        ctx.outcome = ctx.outcome or type(error).__name__
        raise
    except HTTPException as error:   # the framework's (e.g. a body over the size limit: 413)
        status, ctx.outcome = error.status_code, ctx.outcome or type(error).__name__
        raise
    finally:
        if not logs_itself:
            ctx.outcome = ctx.outcome or "internal_error"
            log_summary(ctx, status)
        structlog.contextvars.clear_contextvars()


@get("/v1/models", summary="List models (OpenAI-compatible)")
async def list_models(request: Request) -> Response:
    container = _container(request)
    await client_key(request, container)
    models = await container.models()
    return Response(_encode({"object": "list", "data": models}), media_type="application/json")


ROUTES = [chat_completions, list_models]
