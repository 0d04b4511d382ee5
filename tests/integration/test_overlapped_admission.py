"""A key with room has its rate-limit check overlap the upstream call; the check still decides.

A real FILA (PostgreSQL, Redis, the fake upstream in a thread). The limiter's script calls are
observed (not replaced) to see whether the upstream had been called before the check went out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from fila.adapters.fake_upstream import FakeUpstream
from fila.adapters.ratelimit import MINUTE, window_start
from fila.config import load_settings
from fila.domain.ledger import RECORDED_TOPIC
from tests.support import REDIS_URL, ledger_events, new_pg_url, running_fila

ADMIN = "overlap-admin"
pytestmark = pytest.mark.usefixtures("redis_server")
BODY = {"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": "overlap?"}]}
BYPASS = {"x-fila-cache": "bypass"}


@pytest.fixture(scope="module")
def fake() -> Iterator[Any]:
    with FakeUpstream.start_in_thread() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def server(fake: Any) -> Iterator[Any]:
    settings = load_settings({}, database_url=new_pg_url(), upstream_base_url=fake.base_url,
                             openai_api_key="sk-upstream", admin_token=ADMIN, redis_url=REDIS_URL)
    with running_fila(settings) as handle:
        yield handle


def key_on_plan(server: Any, **limits: int) -> tuple[str, str]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as admin:
        slug = f"ov-{uuid.uuid4().hex[:10]}"
        assert admin.post("/admin/plans", json={"slug": slug, "name": "Overlap", **limits}).status_code == 201
        created = admin.post("/admin/api-keys", json={"name": "overlap", "plan": slug})
        assert created.status_code == 201, created.text
        return created.json()["id"], created.json()["key"]


def chat(server: Any, secret: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=BODY, timeout=10,
                      headers={"Authorization": f"Bearer {secret}", **BYPASS})


class Watch(list):
    """For each check script sent: had the upstream already received this request's call?"""

    upstream_calls_before = 0


class Observed:
    """The limiter's check script, observed: a check sent alone goes through ``__call__``."""

    def __init__(self, script: Any, fake: Any, seen: Watch) -> None:
        self.script, self.sha, self.fake, self.seen = script, script.sha, fake, seen

    async def __call__(self, keys: list, args: list) -> Any:
        deadline = time.monotonic() + 0.15              # under the limiter's own 0.25 s deadline
        while self.fake.stats["chat_completions"] == self.seen.upstream_calls_before and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.seen.append(self.fake.stats["chat_completions"] > self.seen.upstream_calls_before)
        return await self.script(keys=keys, args=args)


@pytest.fixture
def watch(server: Any, fake: Any) -> Iterator[Watch]:
    limiter, seen = server.container.limiter, Watch()
    script = limiter._check_script
    limiter._check_script = Observed(script, fake, seen)
    yield seen
    limiter._check_script = script


def chat_watched(server: Any, fake: Any, watch: Watch, secret: str) -> httpx.Response:
    watch.upstream_calls_before = fake.stats["chat_completions"]
    return chat(server, secret)


def minute_room() -> None:
    if 60 - time.time() % 60 < 5:        # epoch-aligned windows: do not straddle a minute
        time.sleep(60 - time.time() % 60 + 0.05)


def test_a_key_with_room_is_checked_while_the_upstream_answers(server: Any, fake: Any, watch: Watch) -> None:
    _, secret = key_on_plan(server, requests_per_minute=10_000, requests_per_hour=100_000)
    minute_room()
    first, second = (chat_watched(server, fake, watch, secret) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert watch == [False, True]     # unknown room: checked first; then known room: overlapped
    assert second.headers["x-ratelimit-remaining-requests"] == "9998"


def test_a_key_near_its_limit_is_checked_before_the_upstream_is_called(server: Any, fake: Any, watch: Watch) -> None:
    _, secret = key_on_plan(server, requests_per_minute=23)   # room while more than ROOMY_MIN = 20 are left
    minute_room()
    assert [chat_watched(server, fake, watch, secret).status_code for _ in range(4)] == [200] * 4
    assert watch == [False, True, True, False]                # unknown, 22 left, 21 left, 20 left


def test_a_refusal_the_last_answer_did_not_foresee_cancels_the_call_and_is_recorded(
        server: Any, fake: Any, watch: Watch) -> None:
    key_id, secret = key_on_plan(server, requests_per_minute=1_000)
    minute_room()
    assert chat_watched(server, fake, watch, secret).status_code == 200
    # another process spends the whole minute behind this one's back
    minute = f"fila:rl:{{{key_id}}}:m:{window_start(time.time(), MINUTE)}"
    redis.Redis.from_url(REDIS_URL).set(minute, 1_000, ex=120)
    fake.configure(latency_ms=300)
    cancelled = server.container.gateway.overlaps_cancelled
    try:
        refused = chat_watched(server, fake, watch, secret)
    finally:
        fake.configure(latency_ms=0)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "retry-after" in refused.headers
    assert watch == [False, True]                          # the refused call had gone upstream
    assert server.container.gateway.overlaps_cancelled == cancelled + 1
    entries = [e for e in ledger_events(server, RECORDED_TOPIC) if e["api_key_id"] == key_id]
    assert sorted(e["outcome"] for e in entries) == ["ok", "rate_limited"]    # recorded once, not billed
