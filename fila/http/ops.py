"""Operators' endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, get

_encode = msgspec.json.Encoder().encode


@get("/health", summary="Liveness: the process answers")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/ready", summary="Readiness: the event store and Redis answer")
async def ready(request: Request) -> Response:
    checks = await request.app.state.container.readiness()
    ok = all(check["ok"] for check in checks.values())
    return Response(_encode({"status": "ready" if ok else "unavailable", "checks": checks}),
                    status_code=200 if ok else 503, media_type="application/json")


ROUTES = [health, ready]
