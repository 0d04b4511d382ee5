"""The floor under FILA's light-load latency: what any durable gateway on this stack must pay.

A bare Litestar app (run under the same uvicorn flags as FILA) whose one handler reads the
request body, optionally posts it to the upstream with aiohttp (FILA's own hot-path transport),
then commits one row to PostgreSQL (an autocommit INSERT on an async psycopg connection, so the
server flushes its WAL before the answer, as FILA's ledger commit does) and returns the bytes.
No authentication, no cache, no plan, no event encoding, no table lock: the least work that still
sends every answer after a durable write. The benches print it beside their baselines, so the
part of FILA's figure that is FILA's own logic is the difference to this line, in the same run.

    FILA_FLOOR_DATABASE_URL   postgresql://... (the bench's own database; a table fila_floor is made)
    FILA_FLOOR_UPSTREAM       optional: the upstream's chat completions URL to call first
    FILA_FLOOR_BODY           optional: the bytes to answer when there is no upstream
"""

from __future__ import annotations

import os

from litestar import Litestar, Request, Response, post

DATABASE_ENV = "FILA_FLOOR_DATABASE_URL"
UPSTREAM_ENV = "FILA_FLOOR_UPSTREAM"
BODY_ENV = "FILA_FLOOR_BODY"
# as FILA sends it: without a key the upstream refuses at once (401), which is less work than a reply
UPSTREAM_HEADERS = {"content-type": "application/json", "authorization": "Bearer floor"}


def floor_app() -> Litestar:
    """uvicorn factory: see the module's doc."""
    import aiohttp
    import psycopg

    database, upstream = os.environ[DATABASE_ENV], os.environ.get(UPSTREAM_ENV)
    answer = os.environ.get(BODY_ENV, '{"object": "chat.completion", "choices": []}').encode()
    state: dict = {}

    async def connect() -> None:
        state["db"] = await psycopg.AsyncConnection.connect(database, autocommit=True)
        try:
            await state["db"].execute("CREATE TABLE IF NOT EXISTS fila_floor (id bigserial PRIMARY KEY, body bytea)")
        except psycopg.errors.UniqueViolation:     # the other worker made it at the same moment
            pass
        if upstream:
            state["http"] = aiohttp.ClientSession()

    async def close() -> None:
        await state["db"].close()
        if upstream:
            await state["http"].close()

    @post("/v1/chat/completions", status_code=200)
    async def answer_durably(request: Request) -> Response:
        body = await request.body()
        reply = answer
        if upstream:
            async with state["http"].post(upstream, data=body, headers=UPSTREAM_HEADERS) as raw:
                reply = await raw.read()
                if raw.status != 200:     # a floor that skipped the upstream's work would be no floor
                    raise RuntimeError(f"the upstream answered {raw.status}")
        await state["db"].execute("INSERT INTO fila_floor (body) VALUES (%s)", (body,))
        return Response(reply, media_type="application/json")

    return Litestar(route_handlers=[answer_durably], on_startup=[connect], on_shutdown=[close],
                    debug=False, logging_config=None)
