"""The cache's endpoints: the admin's (stats, purge, delete one entry) and the client's own
(its base context, its conversations). Thin: decode, call the cache service, encode.

Admin (admin token, ``/admin`` error shape):
  GET    /admin/cache/stats[?api_key_id=]   hits, misses, hit_rate, tokens_saved; overall and per client
  POST   /admin/cache/purge {"api_key_id"}  drop a client's cached responses in every process
  DELETE /admin/cache/entries/{cache_key}   drop one cached response (the x-fila-cache-key header)
Client (its API key, OpenAI error shape):
  PUT    /v1/fila/context {"system", "reference"}   set (replace) its base context
  GET    /v1/fila/context                            show it (404 if none or expired)
  DELETE /v1/fila/context                            remove it
  GET    /v1/fila/conversations/{id}                 the history FILA would prepend (404 if none)
  DELETE /v1/fila/conversations/{id}                 forget it
Every change is an event in the log (``fila.domain.context``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.params import FromPath

from fila.domain.errors import NotFound
from fila.http.admin_keys import _admin, decode_body, json
from fila.http.auth import client_key


class Purge(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    api_key_id: str


class ContextBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    system: str | None = None
    reference: str | None = None


async def _client(request: Request) -> tuple[Any, str]:
    container = request.app.state.container
    return container, (await client_key(request, container)).id


# -- admin ---------------------------------------------------------------------------------------

@get("/admin/cache/stats", summary="Cache hits, misses, hit rate and tokens saved, overall and per client")
async def cache_stats(request: Request) -> Response:
    container = _admin(request)
    return json(await container.cache.stats(container.projector, container.projections_db,
                                             request.query_params.get("api_key_id"),
                                             wait_for=container.batcher.last_notification_id))


@post("/admin/cache/purge", status_code=200, summary="Drop every cached response of one client")
async def purge(request: Request) -> Response:
    container = _admin(request)
    body = decode_body(await request.body(), Purge)
    if body.api_key_id not in container.registry.keys:
        raise NotFound(f"no API key '{body.api_key_id}'", param="api_key_id", code="api_key_not_found")
    return json(await container.cache.purge(body.api_key_id))


@delete("/admin/cache/entries/{cache_key:str}", status_code=200, summary="Drop one cached response")
async def delete_entry(request: Request, cache_key: FromPath[str]) -> Response:
    container = _admin(request)
    return json(await container.cache.delete_entry(cache_key))


# -- client --------------------------------------------------------------------------------------

@put("/v1/fila/context", status_code=200, summary="Set this key's base context (prepended to its requests)")
async def put_context(request: Request) -> Response:
    container, key_id = await _client(request)
    body = decode_body(await request.body(), ContextBody)
    return json(await container.cache.set_context(key_id, body.system, body.reference))


@get("/v1/fila/context", summary="Show this key's base context")
async def get_context(request: Request) -> Response:
    container, key_id = await _client(request)
    return json(await container.cache.context(key_id))


@delete("/v1/fila/context", status_code=200, summary="Remove this key's base context")
async def delete_context(request: Request) -> Response:
    container, key_id = await _client(request)
    await container.cache.clear_context(key_id)
    return json({"object": "fila.context.deleted", "deleted": True})


@get("/v1/fila/conversations/{conversation_id:str}", summary="Show a conversation's history")
async def get_conversation(request: Request, conversation_id: FromPath[str]) -> Response:
    container, key_id = await _client(request)
    messages = await container.cache.conversation(key_id, conversation_id)
    return json({"id": conversation_id, "object": "fila.conversation", "messages": messages})


@delete("/v1/fila/conversations/{conversation_id:str}", status_code=200, summary="Forget a conversation")
async def delete_conversation(request: Request, conversation_id: FromPath[str]) -> Response:
    container, key_id = await _client(request)
    return json(await container.cache.delete_conversation(key_id, conversation_id))


ROUTES = [cache_stats, purge, delete_entry, put_context, get_context, delete_context, get_conversation,
          delete_conversation]
