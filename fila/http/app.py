"""The Litestar app factory. Nothing is built at import time: ``create_app(container)``."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Router
from litestar.openapi import OpenAPIConfig

from fila.http import admin_keys, ops, v1
from fila.http.errors import EXCEPTION_HANDLERS


async def read_your_writes(request: Request) -> None:
    """Before an admin call, bring this process's registry to the log's head: a key, plan or
    assignment written through another worker a moment ago is seen (admin calls are few)."""
    container = request.app.state.container
    await container.batcher.run(container.registry.catch_up)


def create_app(container: Any, *, extra_routes: list | None = None) -> Litestar:
    routes = [*v1.ROUTES, *admin_keys.ROUTES, *ops.ROUTES, *container.http_routes(), *(extra_routes or [])]
    admin = [r for r in routes if any(path.startswith("/admin") for path in r.paths)]
    others = [r for r in routes if r not in admin]
    app = Litestar(
        # the admin routes alone pay for read-your-writes; the client hot path does not
        route_handlers=[*others, Router(path="/", route_handlers=admin, before_request=read_your_writes)],
        exception_handlers=EXCEPTION_HANDLERS,
        on_startup=[container.start],
        on_shutdown=[container.stop],
        request_max_body_size=container.settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="FILA", version="0.1.0", path="/schema"),
        debug=False,
        logging_config=None,
    )
    app.state.container = container
    return app
