"""The gateway through real HTTP, on SQLite and on PostgreSQL: every answer is in the ledger
before the client has it, and an Idempotency-Key is billed (and sent upstream) once.

Keys are issued on the seeded "enterprise" plan (no rate limits): admission lets them in, and
what is pinned here is the recording.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
import pytest

from fila.config import load_settings
from fila.domain.ledger import RECORDED_TOPIC, entry_id_for
from tests.support import ServerHandle, running_fila

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "gpt-4.1-nano"
NO_CACHE = {"x-fila-cache": "bypass"}  # idempotency must hold on its own, without the response cache


def body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


@contextmanager
def fila_server(settings: Any) -> Iterator[ServerHandle]:
    with running_fila(settings) as handle:   # Container.stop closes its database pools
        yield handle


def entries(server: ServerHandle) -> list[dict[str, Any]]:
    """Every ledger entry in the log, decoded, with its id."""
    notes = server.container.store.recorder.select_notifications(
        start=0, limit=10_000, topics=[RECORDED_TOPIC], inclusive_of_start=False)
    return [dict(msgspec.json.decode(n.state), id=str(n.originator_id), notification_id=n.id) for n in notes]


def new_key(server: ServerHandle, name: str = "client") -> tuple[str, str]:
    """Issue a key through the admin API: (id, secret)."""
    answer = httpx.post(f"{server.base_url}/admin/api-keys", json={"name": name, "plan": "enterprise"},
                        headers={"Authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], answer.json()["key"]


@pytest.fixture
def server(database_url: str, fake_upstream) -> Iterator[ServerHandle]:
    settings = load_settings({}, database_url=database_url, upstream_base_url=fake_upstream.base_url,
                             openai_api_key="sk-upstream", admin_token=ADMIN, log_level="warning")
    with fila_server(settings) as handle:
        yield handle


def chat(server: ServerHandle, secret: str, payload: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=payload,
                      headers={"Authorization": f"Bearer {secret}", **headers}, timeout=10)


def test_a_completion_is_in_the_ledger_before_its_answer_reaches_the_client(server, fake_upstream):
    key_id, secret = new_key(server)
    for count, text in enumerate(("one", "two", "three"), 1):
        answer = chat(server, secret, body(text, temperature=0))
        recorded = entries(server)  # read at once: no waiting, no polling
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        assert len(recorded) == count and all(e["api_key_id"] == key_id for e in recorded)
        entry = recorded[-1]
        assert (entry["outcome"], entry["status"], entry["model"], entry["stream"]) == ("ok", 200, MODEL, False)
        assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
        assert entry["total_tokens"] > 0
        assert entry["upstream"] == f"primary/{MODEL}"
        assert entry["latency_us"] > 0 and entry["response"] is None and entry["idempotency_key"] is None
        assert len(entry["fingerprint"]) >= 16  # of the request, never the prompt itself
        assert text not in entry["fingerprint"]
    assert len({e["fingerprint"] for e in entries(server)}) == 3
    assert fake_upstream.stats["chat_completions"] == 3


def test_a_streamed_completion_is_in_the_ledger_before_its_last_chunk(server):
    key_id, secret = new_key(server)
    frames, recorded = [], None
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions",
                      json=body("stream me", stream=True, stream_options={"include_usage": True}),
                      headers={"Authorization": f"Bearer {secret}"}, timeout=10) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                frames.append(msgspec.json.decode(line[6:]))
                choices = frames[-1]["choices"]
                if recorded is None and choices and choices[0]["finish_reason"]:
                    recorded = [e for e in entries(server) if e["api_key_id"] == key_id]  # at the final chunk
    assert frames[-1]["choices"] == [] and recorded is not None
    usage = frames[-1]["usage"]
    assert len(recorded) == 1 and recorded[0]["stream"] is True and recorded[0]["outcome"] == "ok"
    assert recorded[0]["total_tokens"] == usage["total_tokens"] > 0
    assert recorded[0]["completion_tokens"] == usage["completion_tokens"]


def test_sequential_retries_with_an_idempotency_key_are_answered_from_the_ledger(server, fake_upstream):
    key_id, secret = new_key(server)
    payload = body("pay once")
    first = chat(server, secret, payload, **NO_CACHE, **{"Idempotency-Key": "order-42"})
    retries = [chat(server, secret, payload, **NO_CACHE, **{"Idempotency-Key": "order-42"}) for _ in range(2)]
    assert first.status_code == 200 and all(r.status_code == 200 for r in retries)
    assert all(r.content == first.content for r in retries)
    assert all(r.headers.get("idempotent-replayed") == "true" for r in retries)
    assert "idempotent-replayed" not in first.headers
    assert fake_upstream.stats["chat_completions"] == 1  # the retries never reached the upstream
    mine = [e for e in entries(server) if e["idempotency_key"] == "order-42"]
    assert len(mine) == 1
    assert mine[0]["id"] == str(entry_id_for(key_id, "order-42")) and mine[0]["outcome"] == "ok"
    assert mine[0]["total_tokens"] == first.json()["usage"]["total_tokens"]
    assert len(entries(server)) == 1


async def test_concurrent_requests_with_one_idempotency_key_are_recorded_and_answered_once(server, fake_upstream):
    key_id, secret = new_key(server)
    fake_upstream.configure(latency_ms=50)  # all twenty are in flight together
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5,
                                 headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": "dup",
                                          **NO_CACHE}) as client:
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body("at once"))
                                         for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.json()["id"] for a in answers}) == 1
    assert len({a.content for a in answers}) == 1
    ok = [e for e in entries(server) if e["outcome"] == "ok"]
    assert len(ok) == 1 and ok[0]["id"] == str(entry_id_for(key_id, "dup"))
    assert len(entries(server)) == 1
    assert fake_upstream.stats["chat_completions"] == 1  # the others waited for the first


def test_the_same_idempotency_key_under_another_api_key_is_another_request(server, fake_upstream):
    (id_a, secret_a), (id_b, secret_b) = new_key(server, "a"), new_key(server, "b")
    a = chat(server, secret_a, body("shared"), **NO_CACHE, **{"Idempotency-Key": "same"})
    b = chat(server, secret_b, body("shared"), **NO_CACHE, **{"Idempotency-Key": "same"})
    assert a.status_code == b.status_code == 200
    assert a.json()["id"] != b.json()["id"] and "idempotent-replayed" not in b.headers
    assert fake_upstream.stats["chat_completions"] == 2
    ids = {e["api_key_id"]: e["id"] for e in entries(server)}
    assert ids == {id_a: str(entry_id_for(id_a, "same")), id_b: str(entry_id_for(id_b, "same"))}


def test_a_failed_attempt_does_not_use_up_the_idempotency_key(server, fake_upstream):
    _, secret = new_key(server)
    fake_upstream.configure(status=500)
    failed = chat(server, secret, body("flaky"), **NO_CACHE, **{"Idempotency-Key": "try"})
    assert failed.status_code == 502 and failed.json()["error"]["type"] == "server_error"
    fake_upstream.configure(status=None)
    retried = chat(server, secret, body("flaky"), **NO_CACHE, **{"Idempotency-Key": "try"})
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert sorted(e["outcome"] for e in entries(server)) == ["ok", "upstream_error"]


def test_an_idempotency_key_reused_for_another_request_is_a_409_and_recorded(server, fake_upstream):
    key_id, secret = new_key(server)
    first = chat(server, secret, body("buy one"), **NO_CACHE, **{"Idempotency-Key": "cart-7"})
    other = chat(server, secret, body("buy two"), **NO_CACHE, **{"Idempotency-Key": "cart-7"})
    assert first.status_code == 200
    assert other.status_code == 409, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert fake_upstream.stats["chat_completions"] == 1
    # the same request again is still a retry, answered from the ledger; as a stream too
    again = chat(server, secret, body("buy one"), **NO_CACHE, **{"Idempotency-Key": "cart-7"})
    assert again.status_code == 200 and again.content == first.content
    assert again.headers.get("idempotent-replayed") == "true"
    streamed = chat(server, secret, body("buy one", stream=True), **NO_CACHE, **{"Idempotency-Key": "cart-7"})
    assert streamed.status_code == 200 and streamed.headers.get("idempotent-replayed") == "true"
    recorded = sorted((e["outcome"], e["status"]) for e in entries(server) if e["api_key_id"] == key_id)
    assert recorded == [("idempotency_conflict", 409), ("ok", 200)]


def test_a_retry_is_told_by_the_request_as_sent_not_as_fila_extended_it(server, fake_upstream):
    """FILA prepends the client's base context: a context set between two attempts changes what
    goes upstream, not the client's request, so the second attempt is still a retry."""
    _, secret = new_key(server)
    first = chat(server, secret, body("summarise"), **NO_CACHE, **{"Idempotency-Key": "job-1"})
    context = httpx.put(f"{server.base_url}/v1/fila/context", json={"system": "Answer in French."},
                        headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert context.status_code in (200, 201), context.text
    retry = chat(server, secret, body("summarise"), **NO_CACHE, **{"Idempotency-Key": "job-1"})
    assert first.status_code == retry.status_code == 200
    assert retry.headers.get("idempotent-replayed") == "true" and retry.content == first.content
