"""Plans end to end, as a client sees them: the official openai SDK (max_retries=0) against a real
FILA server (PostgreSQL, Redis, the fake upstream); plans and keys made through the admin API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from fila.adapters.fake_upstream import FakeUpstream
from fila.bootstrap import build_container
from fila.cli import main as fila_cli
from fila.config import load_settings
from fila.services.plans import DEFAULT_PLANS
from tests.support import REDIS_URL, new_pg_url, running_fila

ADMIN = "e2e-admin-token"
pytestmark = pytest.mark.usefixtures("redis_server")
HELLO = [{"role": "user", "content": "Hello, plans"}]


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with FakeUpstream.start_in_thread() as fake:
        settings = load_settings({}, database_url=new_pg_url(), upstream_base_url=fake.base_url,
                                 openai_api_key="sk-upstream", admin_token=ADMIN, redis_url=REDIS_URL)
        with running_fila(settings) as handle:
            yield handle


@pytest.fixture(scope="module")
def admin(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as client:
        yield client


def new_plan(admin: httpx.Client, **terms: Any) -> str:
    slug = f"e2e-{uuid.uuid4().hex[:10]}"
    response = admin.post("/admin/plans", json={"slug": slug, "name": "E2E", **terms})
    assert response.status_code == 201, response.text
    return slug


def new_key(admin: httpx.Client, plan: str) -> tuple[str, str]:
    response = admin.post("/admin/api-keys", json={"name": "e2e", "plan": plan})
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["key"]


def sdk(server: Any, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=secret, max_retries=0, timeout=10)


def ask(client: openai.OpenAI) -> Any:
    return client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)


def wait_for_minute_room(seconds: float = 8.0) -> None:
    """Per-minute windows are epoch-aligned: start a burst with ``seconds`` left in this minute."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.05)


def assignment_url(admin: httpx.Client, key_id: str) -> str:
    return f"/admin/assignments/{admin.get(f'/admin/api-keys/{key_id}/assignments').json()['items'][-1]['id']}"


def test_seed_creates_the_default_plans_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    url = new_pg_url()
    monkeypatch.setenv("FILA_DATABASE_URL", url)
    assert fila_cli(["seed"]) == 0
    assert "created plans: free, basic, pro, enterprise" in capsys.readouterr().out
    assert fila_cli(["seed"]) == 0
    assert "none (all default plans exist)" in capsys.readouterr().out

    async def seed_again() -> tuple[list[str], dict[str, dict]]:
        container = build_container(load_settings({}, database_url=url))
        container.batcher.start()
        try:
            await container.plan_service.refresh()
            created = await container.plan_service.seed()
            return created, {slug: dict(p.terms) for slug, p in container.plans.by_slug.items()}
        finally:
            await asyncio.to_thread(container.batcher.close)
            await container.primary.close()

    created, plans = asyncio.run(seed_again())
    assert created == [] and sorted(plans) == sorted(DEFAULT_PLANS)
    limits = {slug: (t["requests_per_minute"], t["requests_per_hour"], t["requests_per_day"], t["tokens_per_minute"],
                     t["included_tokens"], t["monthly_price_minor"], t["hard_cap"]) for slug, t in plans.items()}
    assert limits == {   # the README's table
        "free": (60, 1_000, 5_000, 40_000, 100_000, 0, True),
        "basic": (300, 10_000, 100_000, 200_000, 2_000_000, 1_900, False),
        "pro": (1_200, 50_000, 1_000_000, 1_000_000, 20_000_000, 9_900, False),
        "enterprise": (None, None, None, None, 300_000_000, 99_900, False),
    }


def test_a_key_on_the_seeded_free_plan_gets_its_limits(server: Any, admin: httpx.Client) -> None:
    _, secret = new_key(admin, "free")
    with sdk(server, secret) as client:
        raw = ask(client)
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].message.content
    assert raw.headers["x-ratelimit-limit-requests"] == "60"
    assert raw.headers["x-ratelimit-remaining-requests"] == "59"
    assert raw.headers["x-ratelimit-limit-tokens"] == "40000"


def test_per_minute_limit_is_a_rate_limit_error_with_openai_headers(server: Any, admin: httpx.Client) -> None:
    plan = new_plan(admin, requests_per_minute=3, requests_per_hour=1000)
    _, secret = new_key(admin, plan)
    with sdk(server, secret) as client:
        wait_for_minute_room()
        remaining = [ask(client).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client)
    assert remaining == ["2", "1", "0"]
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert headers.get_list("retry-after") == [headers["retry-after"]] and 1 <= int(headers["retry-after"]) <= 60


def test_a_roomy_key_is_served_from_a_reserve_with_exact_headers(server: Any, admin: httpx.Client) -> None:
    plan = new_plan(admin, requests_per_minute=1000, requests_per_hour=100_000)
    key_id, secret = new_key(admin, plan)
    with sdk(server, secret) as client:
        wait_for_minute_room()
        remaining = [int(ask(client).headers["x-ratelimit-remaining-requests"]) for _ in range(6)]
    assert remaining == list(range(999, 993, -1))
    assert server.container.limiter.reserved(key_id)       # FILA_RATE_LIMIT_RESERVE's default: on


def test_rate_limit_reserve_zero_turns_reserves_off() -> None:
    settings = load_settings({"FILA_RATE_LIMIT_RESERVE": "0"}, database_url=new_pg_url(), redis_url=REDIS_URL,
                             openai_api_key="sk-upstream", upstream_base_url="http://127.0.0.1:9/v1")
    container = build_container(settings)

    async def close() -> None:
        await container.primary.close()
        await container.redis.aclose()

    try:
        assert container.limiter is not None and container.limiter._reserve_max == 0
    finally:
        asyncio.run(close())
        container.store.close()


def test_suspended_is_403_and_reactivated_is_200_again(server: Any, admin: httpx.Client) -> None:
    key_id, secret = new_key(admin, new_plan(admin))
    url = assignment_url(admin, key_id)
    with sdk(server, secret) as client:
        assert ask(client).http_response.status_code == 200
        assert admin.post(f"{url}/suspend", json={"reason": "card declined"}).status_code == 200
        with pytest.raises(openai.PermissionDeniedError) as denied:
            ask(client)
        assert denied.value.status_code == 403 and denied.value.code == "assignment_suspended"
        assert admin.post(f"{url}/reactivate").status_code == 200
        assert ask(client).http_response.status_code == 200
        assert admin.post(f"{url}/cancel").status_code == 200
        with pytest.raises(openai.PermissionDeniedError) as denied:
            ask(client)
        assert denied.value.code == "assignment_cancelled"


def test_hard_cap_stops_at_the_included_tokens_and_no_cap_lets_requests_continue(
        server: Any, admin: httpx.Client) -> None:
    _, capped_secret = new_key(admin, new_plan(admin, included_tokens=10, hard_cap=True))
    _, open_secret = new_key(admin, new_plan(admin, included_tokens=10, hard_cap=False,
                                             output_price_per_million="1.00"))
    with sdk(server, capped_secret) as capped, sdk(server, open_secret) as uncapped:
        first = ask(capped)                   # 0 of 10 used: admitted, and it spends more than 10
        assert first.http_response.status_code == 200 and first.parse().usage.total_tokens > 10
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as refused:
                ask(capped)
            assert refused.value.code == "insufficient_quota"
            assert refused.value.body["type"] == "insufficient_quota"
            assert int(refused.value.response.headers["retry-after"]) >= 1
        for _ in range(3):                    # past the allowance: overage, never refused
            assert ask(uncapped).http_response.status_code == 200
