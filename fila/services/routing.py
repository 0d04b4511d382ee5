"""Routes a completion to the upstream through a circuit breaker per (upstream, model), with fallback.

The order of routes is: the primary upstream with the requested model, then the fallback
(``FILA_FALLBACK_BASE_URL`` and/or ``FILA_FALLBACK_MODEL``) when one is configured. A route
whose breaker is open is skipped without touching its upstream; a route that fails (5xx,
timeout, connection) moves on to the next. The upstream's own 4xx is the client's problem:
it is passed back at once and counts as a healthy answer. When every route is open the
caller gets ``UpstreamUnavailable`` with the shortest ``Retry-After``, within microseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fila.adapters.breaker import BreakerSettings, CircuitBreaker, CircuitOpenError, Transition
from fila.domain.errors import UpstreamClientError, UpstreamError, UpstreamUnavailable


MAX_BREAKERS = 256


class Upstream(Protocol):
    name: str

    async def complete(self, model: str, messages: list, extra: dict[str, Any]) -> Any: ...

    def stream(self, model: str, messages: list, extra: dict[str, Any]) -> Any: ...


class Route:
    __slots__ = ("upstream", "model", "breaker")

    def __init__(self, upstream: Upstream, model: str, breaker: CircuitBreaker) -> None:
        self.upstream = upstream
        self.model = model
        self.breaker = breaker


class Router:
    def __init__(self, primary: Upstream, *, fallback: Upstream | None = None,
                 fallback_model: str | None = None, settings: BreakerSettings = BreakerSettings(),
                 on_transition: Callable[[Transition], None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.primary = primary
        self.fallback = fallback
        self.fallback_model = fallback_model
        self.settings = settings
        self.on_transition = on_transition
        self.clock = clock
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._routes: dict[str, list[Route]] = {}

    def breaker(self, upstream: Upstream, model: str) -> CircuitBreaker:
        key = (upstream.name, model)
        breaker = self.breakers.get(key)
        if breaker is None:
            if len(self.breakers) >= MAX_BREAKERS:   # clients may name any model: stay bounded
                for stale in [k for k, b in self.breakers.items() if b.state.value == "closed"]:
                    del self.breakers[stale]
                self._routes.clear()
            kwargs: dict[str, Any] = {"on_transition": self.on_transition}
            if self.clock is not None:
                kwargs["clock"] = self.clock
            breaker = self.breakers[key] = CircuitBreaker(f"{upstream.name}/{model}", self.settings, **kwargs)
        return breaker

    def routes(self, model: str) -> list[Route]:
        routes = self._routes.get(model)
        if routes is None:
            routes = self._routes[model] = self._build_routes(model)
        return routes

    def _build_routes(self, model: str) -> list[Route]:
        routes = [Route(self.primary, model, self.breaker(self.primary, model))]
        if self.fallback is not None or self.fallback_model is not None:
            upstream = self.fallback or self.primary
            fallback_model = self.fallback_model or model
            if (upstream.name, fallback_model) != (self.primary.name, model):
                routes.append(Route(upstream, fallback_model, self.breaker(upstream, fallback_model)))
        return routes

    async def complete(self, model: str, messages: list, extra: dict[str, Any]) -> tuple[Any, Route]:
        """Call the first healthy route; returns (reply, route used)."""
        reply, route, permit = await self._first_healthy(
            model, lambda route: route.upstream.complete(route.model, messages, extra))
        permit.success()
        return reply, route

    async def open_stream(self, model: str, messages: list, extra: dict[str, Any]) -> tuple[Any, Any, Route, Any]:
        """Open a stream on the first healthy route.

        Returns (context manager, line iterator, route, permit); the caller must close the
        context manager and settle the permit when the stream ends.
        """
        async def enter(route: Route) -> tuple[Any, Any]:
            manager = route.upstream.stream(route.model, messages, extra)
            return manager, await manager.__aenter__()

        (manager, lines), route, permit = await self._first_healthy(model, enter)
        return manager, lines, route, permit

    async def _first_healthy(self, model: str, call: Callable[[Route], Any]) -> tuple[Any, Route, Any]:
        """``call`` on each route in turn: skip an open circuit, move on after a failure."""
        failure: UpstreamError | None = None
        retry_after: float | None = None
        for route in self.routes(model):
            try:
                permit = route.breaker.acquire()
            except CircuitOpenError as error:
                retry_after = error.retry_after if retry_after is None else min(retry_after, error.retry_after)
                continue
            try:
                result = await call(route)
            except UpstreamClientError:
                permit.neutral()
                raise
            except UpstreamError as error:
                permit.failure()
                failure = error
                continue
            except BaseException:
                permit.release()
                raise
            return result, route, permit
        if failure is not None:
            raise failure
        raise UpstreamUnavailable("the upstream is unavailable (circuit open); retry later",
                                  retry_after=retry_after or 1.0)
