"""Redis going away, going slow and coming back, under a running FILA: every request still
answers 200, the in-process layer keeps serving, the ledger says the shared layer was
degraded, and Redis hits resume by themselves. The test runs its own redis-server on a free
port (the shared one on 6379 is never touched)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
import pytest
import redis

from fila.config import load_settings
from tests.support import ServerHandle, free_port, running_fila

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "gpt-4.1-nano"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class RedisProcess:
    """A redis-server of the test's own, on ``port``: start, pause (slow), resume, stop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if probe.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def redis_server(port: int) -> Iterator[RedisProcess]:
    process = RedisProcess(port)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def chat(server: ServerHandle, secret: str, content: str) -> httpx.Response:
    started = time.perf_counter()
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=15,
                        headers={"Authorization": f"Bearer {secret}"},
                        json={"model": MODEL, "messages": [{"role": "user", "content": content}]})
    answer.elapsed_s = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    return answer


def entries(server: ServerHandle) -> list[dict[str, Any]]:
    notes = server.container.store.recorder.select_notifications(
        start=0, limit=10_000, topics=["fila:LedgerEntry.Recorded"], inclusive_of_start=False)
    return [msgspec.json.decode(n.state) for n in notes]


def cache_of(answer: httpx.Response) -> tuple[str, str | None]:
    return answer.headers["x-fila-cache"], answer.headers.get("x-fila-cache-layer")


def test_fila_keeps_answering_through_a_slow_then_dead_redis_and_resumes_redis_hits(pg_url, fake_upstream):
    port = free_port()
    with redis_server(port) as own_redis:
        settings = load_settings({}, database_url=pg_url, upstream_base_url=fake_upstream.base_url,
                                 openai_api_key="sk-upstream", admin_token=ADMIN, log_level="warning",
                                 redis_url=f"redis://127.0.0.1:{port}/0")
        with running_fila(settings) as server:
            created = httpx.post(f"{server.base_url}/admin/api-keys", json={"name": "outage", "plan": "enterprise"},
                                 headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
            secret = created.json()["key"]
            cache = server.container.cache
            assert cache_of(chat(server, secret, "before")) == ("miss", None)
            assert cache_of(chat(server, secret, "before")) == ("hit", "memory")

            own_redis.pause()                            # Redis hangs: every call would time out
            slow = [chat(server, secret, f"slow {i}") for i in range(3)]
            assert [cache_of(a) for a in slow] == [("miss", None)] * 3
            assert max(a.elapsed_s for a in slow) < 1.5  # one 0.25 s timeout, then skipped
            own_redis.resume()
            time.sleep(cache.shared.backoff_s + 0.1)
            assert cache_of(chat(server, secret, "slow over")) == ("miss", None)
            assert entries(server)[-1]["cache_layer"] is None          # healthy again by itself

            own_redis.stop()                             # Redis goes away
            assert cache_of(chat(server, secret, "before")) == ("hit", "memory")   # the memory layer goes on
            during = [chat(server, secret, f"during {i}") for i in range(5)]
            assert [cache_of(a) for a in during] == [("miss", None)] * 5
            assert max(a.elapsed_s for a in during) < 1.0
            assert cache_of(chat(server, secret, "during 0")) == ("hit", "memory")  # filled memory meanwhile
            degraded = [e for e in entries(server) if e["cache_layer"] == "degraded"]
            assert len(degraded) == 8 and {e["cache"] for e in degraded} == {"miss"}
            assert {e["outcome"] for e in degraded} == {"ok"}

            own_redis.start()                            # Redis is back (empty) on the same port
            time.sleep(cache.shared.backoff_s + 0.1)
            assert cache_of(chat(server, secret, "after")) == ("miss", None)
            assert entries(server)[-1]["cache_layer"] is None
            assert redis.Redis(port=port).keys("fila:cache:r:*"), "the answer was written to Redis again"
            cache.memory.clear()                         # as a process that never saw it would be
            assert cache_of(chat(server, secret, "after")) == ("hit", "redis")
            assert entries(server)[-1]["cache_layer"] == "redis"
