"""Builds everything once: logging, adapters, applications, projections -> a Container.

Only this module sees every layer. ``create_app(build_container(settings))`` is the whole
wiring; ``app_from_env`` is the factory uvicorn's workers call, one container per process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import threading
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import msgspec
import structlog

from fila.adapters.batcher import Batcher
from fila.adapters.breaker import BreakerSettings, Transition
from fila.adapters.cache_store import MemoryLRU, RedisStore
from fila.adapters.eventstore import FilaStore, open_store
from fila.adapters.ratelimit import RateLimiter
from fila.adapters.upstream import OpenAIUpstream
from fila.config import ConfigError, Settings, load_settings
from fila.domain.errors import Conflict
from fila.domain.ledger import BreakerTransition
from fila.domain.time import iso
from fila.projections.db import open_database
from fila.projections.planbook import PlanBook
from fila.projections.registry import Registry
from fila.projections.runner import Projector
from fila.services.admission import CycleTokens, PlanAdmission
from fila.services.audit import Auditor
from fila.services.billing import BillingService, CycleCloser
from fila.services.cache import CacheService
from fila.services.gateway import Gateway
from fila.services.keys import KeyService
from fila.services.plan_stats import PlanStats
from fila.services.plans import PlanService
from fila.services.routing import Router

log = structlog.get_logger("fila")


def _json_line(event: dict, **_: Any) -> str:
    return msgspec.json.encode(event, enc_hook=str).decode()


def configure_logging(settings: Settings) -> None:
    """structlog, once: JSON when not on a terminal, readable on one."""
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    # plain tracebacks only: a "rich" one prints frame locals, and locals hold keys and prompts
    renderer = (structlog.processors.JSONRenderer(serializer=_json_line) if use_json
                else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback))
    level = getattr(logging, settings.log_level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Container:
    """Every long-lived object of one FILA process, with its start and stop."""

    def __init__(self, settings: Settings, store: FilaStore) -> None:
        self.settings = settings
        self.store = store
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        self.batcher = Batcher(store, max_size=settings.batch_max_size,
                               max_wait=settings.batch_max_wait_ms / 1000, express=settings.batch_express)
        self.registry = Registry(store.recorder)
        self.plans = PlanBook().attach(self.registry)
        self.redis = redis_client(settings.redis_url) if settings.redis_url else None
        self.limiter = (RateLimiter(self.redis, reserve=settings.rate_limit_reserve)
                        if self.redis is not None else None)
        self.admission = PlanAdmission(self.plans, self.limiter, CycleTokens(self.redis),
                                       refresh=lambda: self.registry.refresh(self.batcher.run))
        self.keys = KeyService(self.batcher, self.registry)
        self.plan_service = PlanService(self.batcher, self.registry, self.plans)
        self.plan_stats = PlanStats(store.recorder, self.registry, self.plans, self.batcher.run)
        api_key = settings.openai_api_key or "fila-fake-upstream"
        self.primary = OpenAIUpstream("primary", settings.upstream_base_url, api_key,
                                      timeout=settings.upstream_timeout_s,
                                      connect_timeout=settings.upstream_connect_timeout_s)
        self.fallback = None
        if settings.fallback_base_url:
            self.fallback = OpenAIUpstream("fallback", settings.fallback_base_url, api_key,
                                           timeout=settings.upstream_timeout_s,
                                           connect_timeout=settings.upstream_connect_timeout_s)
        self.router = Router(self.primary, fallback=self.fallback, fallback_model=settings.fallback_model,
                             settings=BreakerSettings(
                                 failure_threshold=settings.breaker_failure_threshold,
                                 error_rate_threshold=settings.breaker_error_rate,
                                 window_seconds=settings.breaker_window_s,
                                 min_calls_in_window=settings.breaker_min_calls,
                                 open_seconds=settings.breaker_open_s),
                             on_transition=self._breaker_transitioned)
        self.cache = CacheService(memory=MemoryLRU(settings.cache_memory_mb * 1024 * 1024),
                                  shared=RedisStore(self.redis) if self.redis is not None else None,
                                  plans=self.plans, batcher=self.batcher, registry=self.registry)
        self.gateway = Gateway(batcher=self.batcher, router=self.router, admission=self.admission,
                               cache=self.cache)
        # projections: the views' tables sit next to the events (same database, same schema)
        self.projections_db = open_database(settings.database_url)
        self.projector = Projector(self.projections_db, store.recorder)
        self.closer = CycleCloser(store, self.projections_db)
        self.billing = BillingService(batcher=self.batcher, projector=self.projector, db=self.projections_db,
                                      book=self.plans)
        self.audit = Auditor(store.recorder, self.projections_db, self.batcher.run)
        self._projector_stop = threading.Event()
        self._projector_thread: threading.Thread | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.batcher.start()
        await self.batcher.run(self.registry.catch_up)
        if not self.plans.by_slug:   # a brand-new ledger: the default plans, as `fila seed` makes them
            await self.plan_service.seed()
        self._stop = asyncio.Event()
        self._tasks.append(asyncio.create_task(self.registry.follow(self.batcher.run, self._stop)))
        if self.settings.embedded_projector:
            self.start_projector()
        log.info("started", process=self.process, database="postgres" if self.settings.is_postgres else "sqlite",
                 upstream=self.settings.upstream_base_url or "https://api.openai.com/v1")

    async def stop(self) -> None:
        self._stop.set()
        await self.gateway.drain()
        await self.cache.drain()
        if self.limiter is not None:
            await self.limiter.release()        # unused reserved rate-limit slots go back to Redis
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self._tasks.clear()
        await self.primary.close()
        if self.fallback is not None:
            await self.fallback.close()
        await asyncio.to_thread(self.stop_projector)
        await asyncio.to_thread(self.batcher.close)
        await asyncio.to_thread(self.store.close)       # the event store's connection pool
        if self.redis is not None:
            await self.redis.aclose()

    def start_projector(self) -> None:
        """Follow the log in a thread of this process (``FILA_EMBEDDED_PROJECTOR``; else ``fila projections run``)."""
        if self._projector_thread is None:
            self._projector_stop.clear()
            self._projector_thread = threading.Thread(
                target=lead_projections, args=(self.settings.database_url, self.projector, self.closer,
                                               self._projector_stop),
                name="fila-projector", daemon=True)
            self._projector_thread.start()

    def stop_projector(self) -> None:
        self._projector_stop.set()
        if self._projector_thread is not None:
            self._projector_thread.join(timeout=15)
            self._projector_thread = None
        self.projector.close()
        self.projections_db.close()

    def http_routes(self) -> list:
        from fila.http import admin_assignments, admin_audit, admin_billing, admin_plans, cache_routes

        return [*admin_plans.ROUTES, *admin_assignments.ROUTES, *cache_routes.ROUTES, *admin_billing.ROUTES,
                *admin_audit.ROUTES]

    # -- services the HTTP layer calls ---------------------------------------------------------

    async def issue_key(self, name: str, owner: str | None, plan: str | None) -> Any:
        """Issue a key and put it on ``plan`` (default ``FILA_DEFAULT_PLAN``)."""
        plan_ref = plan or self.settings.default_plan
        plan_record = self.plan_service.plan(plan_ref)   # an unknown plan fails before the key exists
        if not plan_record.active:
            raise Conflict(f"plan '{plan_record.slug}' is deactivated: it takes no new assignments",
                           param="plan", code="plan_inactive")
        record, secret = await self.keys.create(name, owner)
        await self.plan_service.assign(record.id, plan_ref)
        return record, secret

    async def plan_usage(self, plan_id: str) -> dict[str, Any]:
        """Tokens and requests this cycle and revenue so far of one plan (see fila.services.plan_stats)."""
        return await self.plan_stats.plan_usage(plan_id)

    async def assignment_usage_stats(self) -> dict[str, Any]:
        """The same figures over every assignment."""
        return await self.plan_stats.assignment_usage()

    async def models(self) -> list[dict[str, Any]]:
        try:
            return await asyncio.wait_for(self.primary.list_models(), timeout=2.0)
        except Exception as error:  # the upstream is down: answer with what FILA itself serves
            log.warning("models_fallback", error=type(error).__name__)
            names = [self.settings.default_model] + ([self.settings.fallback_model]
                                                      if self.settings.fallback_model else [])
            return [{"id": name, "object": "model", "created": 0, "owned_by": "fila"} for name in names]

    async def readiness(self) -> dict[str, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        try:
            await asyncio.wait_for(self.batcher.run(self.store.recorder.max_notification_id), timeout=2.0)
            checks["event_store"] = {"ok": True}
        except Exception as error:  # readiness reports, it does not fail
            checks["event_store"] = {"ok": False, "error": type(error).__name__}
        breakers = {b.name: b.snapshot()["state"] for b in self.router.breakers.values()}
        checks["upstream"] = {"ok": True, "breakers": breakers}
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.ping(), timeout=1.0)
                checks["redis"] = {"ok": True}
            except Exception as error:  # readiness reports, it does not fail
                checks["redis"] = {"ok": False, "error": type(error).__name__}
        return checks

    def _breaker_transitioned(self, transition: Transition) -> None:
        log.warning("breaker_transition", breaker=transition.breaker, from_state=transition.from_state.value,
                    to_state=transition.to_state.value, reason=transition.reason)
        event = BreakerTransition(id=uuid4(), breaker=transition.breaker, from_state=transition.from_state.value,
                                  to_state=transition.to_state.value, reason=transition.reason,
                                  at=iso(datetime.now(UTC)), process=self.process)
        try:
            task = asyncio.get_running_loop().create_task(self.batcher.commit(event))
        except RuntimeError:  # no loop (a sync caller): record it synchronously
            self.store.save(event)
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def follow_log(projector: Projector, closer: CycleCloser, stop: threading.Event) -> None:
    """Keep every view at the log's head; after each catch-up, close the cycles the billing view found due."""
    def close_due(applied: int) -> None:
        try:
            closer.run_once()
        except Exception as error:  # the store may be briefly down: the next catch-up retries
            log.error("cycle_closer_failed", error=repr(error), exc_info=True)

    close_due(0)
    projector.follow(stop, on_idle=close_due)


def lead_projections(database_url: str, projector: Any, closer: Any, stop: threading.Event) -> None:
    """Run the embedded projector in one process only.

    With PostgreSQL, every worker of every FILA process may have the embedded projector on;
    the one holding a session advisory lock (keyed by the database URL, schema included)
    follows the log, the others wait and take over within seconds if it goes away. Running
    two followers would be correct (each page's tracking update is conditional) but would
    spend the CPU twice. SQLite serves one process: it just runs.
    """
    if not database_url.startswith(("postgresql://", "postgres://")):
        follow_log(projector, closer, stop)
        return
    import hashlib

    import psycopg

    from fila.adapters.eventstore import store_env

    env = store_env(database_url)
    key = int.from_bytes(hashlib.sha256(database_url.encode()).digest()[:8], "big", signed=True)
    while not stop.is_set():
        try:
            with psycopg.connect(host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"], dbname=env["POSTGRES_DBNAME"],
                                 user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"] or None,
                                 autocommit=True) as conn:
                while not stop.is_set():
                    if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                        log.info("projector_leading")
                        follow_log(projector, closer, stop)
                        return
                    stop.wait(2.0)
        except psycopg.Error as error:  # the database is briefly away: try again shortly
            log.warning("projector_lock_failed", error=type(error).__name__)
            stop.wait(2.0)


def redis_client(url: str) -> Any:
    """A client that fails fast: no retries, short timeouts (the callers fall back by themselves)."""
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return aioredis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.1,
                                   retry=Retry(NoBackoff(), 0), health_check_interval=0)


def build_container(settings: Settings) -> Container:
    if not settings.is_postgres and settings.workers > 1:
        raise ConfigError("FILA_WORKERS > 1 needs PostgreSQL (FILA_DATABASE_URL=postgresql://...): "
                          "SQLite serves a single process")
    return Container(settings, open_store(settings.database_url))


def app_from_env() -> Any:
    """uvicorn factory: one container per worker process."""
    from fila.http.app import create_app

    settings = load_settings()
    configure_logging(settings)
    sys.setswitchinterval(0.001)       # the batcher thread hands the GIL back sooner: lower p99
    app = create_app(build_container(settings))
    # Everything built so far lives as long as the process: keep it out of the collector's
    # generations, and collect the young one less often (requests allocate many short-lived
    # objects; frequent full passes over a big heap showed up as p99 stalls).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    return app
