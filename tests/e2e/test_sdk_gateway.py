"""End to end: the official openai SDK against a running FILA (uvicorn, PostgreSQL) and the fake upstream.

Plain and streamed completions, keys (bad, revoked, rotated), malformed and oversized bodies,
the upstream's own 4xx, the upstream going down (breaker opens, fails fast, recovers), the
fallback upstream, a client leaving mid-stream, and the operators' endpoints.
Keys are issued on the seeded "enterprise" plan (no rate limits); plans have their own tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
import openai
import pytest

from fila.adapters.fake_upstream import FakeUpstream
from fila.config import load_settings
from tests.support import ServerHandle, free_port, running_fila, wait_for
from tests.support import ledger_events as log

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "gpt-4.1-nano"
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to FILA"}]
TRANSITIONED = "fila:BreakerTransition.Transitioned"
RECORDED = "fila:LedgerEntry.Recorded"
NO_CACHE = {"x-fila-cache": "bypass"}  # where the upstream path itself is under test


# -- helpers ------------------------------------------------------------------------------------


@contextmanager
def serve(database_url: str, upstream_base_url: str, **overrides: Any) -> Iterator[ServerHandle]:
    settings = load_settings({}, database_url=database_url, upstream_base_url=upstream_base_url,
                             openai_api_key="sk-upstream", admin_token=ADMIN, log_level="warning",
                             **overrides)
    with running_fila(settings) as handle:   # Container.stop closes its database pools
        yield handle


def admin(server: ServerHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=10, **kwargs)


def new_key(server: ServerHandle, name: str = "sdk") -> tuple[str, str]:
    answer = admin(server, "POST", "/admin/api-keys", json={"name": name, "plan": "enterprise"})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], answer.json()["key"]


def sdk(server: ServerHandle, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=secret, max_retries=0, timeout=10)






def assert_openai_error_shape(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.fixture
def server(pg_url: str, fake_upstream) -> Iterator[ServerHandle]:
    with serve(pg_url, fake_upstream.base_url, max_body_bytes=2048) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> Iterator[tuple[openai.OpenAI, str]]:
    key_id, secret = new_key(server)
    with sdk(server, secret) as c:
        yield c, key_id


# -- completions --------------------------------------------------------------------------------


def test_a_plain_completion(server, client, fake_upstream):
    sdk_client, key_id = client
    completion = sdk_client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content and completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens > 0
    [entry] = log(server, RECORDED)
    assert (entry["api_key_id"], entry["outcome"], entry["total_tokens"]) == (key_id, "ok",
                                                                             completion.usage.total_tokens)
    assert fake_upstream.stats["chat_completions"] == 1


def test_a_stream_reassembles_to_the_plain_answer_and_carries_usage_only_when_asked(server, client):
    sdk_client, key_id = client
    plain = sdk_client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, extra_headers=NO_CACHE)

    chunks = list(sdk_client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, stream=True,
                                                     extra_headers=NO_CACHE))
    assert len(chunks) > 2 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)  # not asked: no usage chunk
    assert chunks[-1].choices[0].finish_reason == "stop"

    with_usage = list(sdk_client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, stream=True,
                                                         stream_options={"include_usage": True},
                                                         extra_headers=NO_CACHE))
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == \
        plain.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    assert "".join(c.choices[0].delta.content or "" for c in with_usage if c.choices) == \
        plain.choices[0].message.content

    entries = log(server, RECORDED)
    assert [e["stream"] for e in entries] == [False, True, True]
    for entry in entries:  # the stream that did not ask for usage is still billed the upstream's count
        assert entry["outcome"] == "ok" and entry["error"] is None and entry["api_key_id"] == key_id
        assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (
            plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens)
    assert len({e["fingerprint"] for e in entries}) == 1


def test_the_models_list_answers_the_sdk(client):
    sdk_client, _ = client
    ids = [model.id for model in sdk_client.models.list()]
    assert MODEL in ids and "gpt-4o" in ids


# -- keys ---------------------------------------------------------------------------------------


def test_a_bad_key_a_missing_key_and_a_revoked_key_are_401(server, fake_upstream):
    with sdk(server, "fila-sk-not-a-key") as stranger, pytest.raises(openai.AuthenticationError) as raised:
        stranger.chat.completions.create(model=MODEL, messages=HELLO)
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    missing = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert_openai_error_shape(missing, 401)

    key_id, secret = new_key(server)
    with sdk(server, secret) as sdk_client:
        sdk_client.chat.completions.create(model=MODEL, messages=HELLO)
        revoked = admin(server, "POST", f"/admin/api-keys/{key_id}/revoke", json={"reason": "leaked"})
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        with pytest.raises(openai.AuthenticationError):
            sdk_client.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            sdk_client.models.list()
    again = admin(server, "POST", f"/admin/api-keys/{key_id}/revoke")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_revoked"
    assert fake_upstream.stats["chat_completions"] == 1  # refused requests never reach the upstream
    assert len(log(server, RECORDED)) == 1


def test_a_rotated_key_answers_only_to_its_new_secret(server):
    key_id, old = new_key(server)
    rotated = admin(server, "POST", f"/admin/api-keys/{key_id}/rotate")
    assert rotated.status_code == 200 and rotated.json()["id"] == key_id
    new = rotated.json()["key"]
    assert new != old
    with sdk(server, old) as old_client, pytest.raises(openai.AuthenticationError):
        old_client.chat.completions.create(model=MODEL, messages=HELLO)
    with sdk(server, new) as new_client:
        assert new_client.chat.completions.create(model=MODEL, messages=HELLO).choices
    assert [e["api_key_id"] for e in log(server, RECORDED)] == [key_id]


def test_a_client_key_cannot_open_the_admin_api(server):
    _, secret = new_key(server)
    for method, path in [("GET", "/admin/api-keys"), ("POST", "/admin/api-keys")]:
        answer = httpx.request(method, f"{server.base_url}{path}", json={"name": "x"},
                               headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 401
        assert set(answer.json()["error"]) == {"code", "message", "field"}
    assert len(admin(server, "GET", "/admin/api-keys").json()["items"]) == 1


# -- bad requests -------------------------------------------------------------------------------


def test_a_malformed_body_is_a_400_in_openais_shape_naming_the_field(server, client, fake_upstream):
    _, secret = new_key(server, "raw")
    url, auth = f"{server.base_url}/v1/chat/completions", {"Authorization": f"Bearer {secret}"}
    wrong_type = httpx.post(url, json={"model": MODEL, "messages": "hello"}, headers=auth)
    error = assert_openai_error_shape(wrong_type, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    not_json = httpx.post(url, content=b'{"model": ', headers={**auth, "Content-Type": "application/json"})
    assert assert_openai_error_shape(not_json, 400)["code"] == "invalid_json"

    sdk_client, _ = client
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert raised.value.param == "messages[0].role"
    assert fake_upstream.stats["chat_completions"] == 0


def test_an_oversized_body_is_a_413_in_openais_shape(server, client, fake_upstream):
    _, secret = new_key(server, "raw")
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]}
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json=big,
                        headers={"Authorization": f"Bearer {secret}"})
    assert assert_openai_error_shape(answer, 413)["type"] == "invalid_request_error"
    sdk_client, _ = client
    with pytest.raises(openai.APIStatusError) as raised:
        sdk_client.chat.completions.create(model=MODEL, messages=big["messages"])
    assert raised.value.status_code == 413
    assert fake_upstream.stats["chat_completions"] == 0


# -- the upstream's answers and failures --------------------------------------------------------


def test_the_upstreams_404_is_passed_back_and_does_not_open_the_breaker(server, client, fake_upstream):
    sdk_client, _ = client
    for _ in range(5):  # more than breaker_failure_threshold (5 by default; 3 below)
        with pytest.raises(openai.NotFoundError) as raised:
            sdk_client.chat.completions.create(model="no-such-model", messages=HELLO)
        assert raised.value.code == "model_not_found" and "no-such-model" in raised.value.message
    assert fake_upstream.stats["chat_completions"] == 5
    assert server.container.router.breakers[("primary", "no-such-model")].state.value == "closed"
    assert [e["outcome"] for e in log(server, RECORDED)] == ["upstream_rejected"] * 5
    assert log(server, TRANSITIONED) == []


def breaker_cycle(server: ServerHandle, count_upstream_calls: Callable[[], int], heal: Callable[[], None],
                  model: str) -> set[str]:
    """Three failures open the breaker; it then fails fast; once healed, one probe closes it.

    Returns the error codes the three failures were answered with."""
    _, secret = new_key(server)
    codes = set()
    with sdk(server, secret) as sdk_client:
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as raised:
                sdk_client.chat.completions.create(model=model, messages=HELLO)
            assert raised.value.status_code in (502, 504)
            codes.add(raised.value.code)
        calls = count_upstream_calls()
        for _ in range(5):
            started = time.perf_counter()
            with pytest.raises(openai.InternalServerError) as raised:
                sdk_client.chat.completions.create(model=model, messages=HELLO)
            assert time.perf_counter() - started < 0.25  # failed fast: not one upstream timeout (0.6 s) waited for
            assert raised.value.status_code == 503 and raised.value.code == "upstream_unavailable"
            assert int(raised.value.response.headers["retry-after"]) >= 1
        assert count_upstream_calls() == calls  # the open breaker kept every call off the upstream

        heal()

        def recovered() -> Any:
            try:
                return sdk_client.chat.completions.create(model=model, messages=HELLO)
            except openai.InternalServerError as error:
                assert error.status_code == 503  # still open: failing fast until breaker_open_s has passed
                return None

        assert wait_for(recovered, timeout=5, what="the breaker to close").choices
        assert count_upstream_calls() == calls + 1  # one half-open probe, and it closed the breaker
        sdk_client.chat.completions.create(model=model, messages=HELLO)

    def transitions() -> list[tuple[str, str]] | None:  # recorded in the background: poll for them
        seen = [(t["from_state"], t["to_state"]) for t in log(server, TRANSITIONED)
                if t["breaker"] == f"primary/{model}"]
        return seen if len(seen) >= 3 else None

    assert wait_for(transitions, what="the breaker's transitions in the log") == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    outcomes = [e["outcome"] for e in log(server, RECORDED)]
    assert outcomes[:3] == ["upstream_error"] * 3 and outcomes[-2:] == ["ok", "ok"]
    assert set(outcomes[3:-2]) == {"breaker_open"}
    return codes


BREAKER = {"breaker_failure_threshold": 3, "breaker_open_s": 0.5}


def test_an_upstream_answering_503_opens_the_breaker_which_fails_fast_then_recovers(pg_url, fake_upstream):
    model = f"fake-{uuid.uuid4().hex[:8]}"
    with serve(pg_url, fake_upstream.base_url, **BREAKER) as server:
        fake_upstream.configure(status=503)
        codes = breaker_cycle(server, lambda: fake_upstream.stats["chat_completions"],
                              lambda: fake_upstream.configure(status=None), model)
    assert codes == {"upstream_error"}


def test_an_upstream_that_hangs_opens_the_breaker_which_fails_fast_then_recovers(pg_url, fake_upstream):
    model = f"fake-{uuid.uuid4().hex[:8]}"
    with serve(pg_url, fake_upstream.base_url, upstream_timeout_s=0.6, **BREAKER) as server:
        fake_upstream.configure(hang=True)
        codes = breaker_cycle(server, lambda: fake_upstream.stats["chat_completions"],
                              lambda: fake_upstream.configure(hang=False), model)
    assert codes == {"upstream_timeout"}


def test_an_upstream_that_is_gone_opens_the_breaker_which_recovers_when_it_is_back(pg_url):
    port = free_port()
    revived: list[Any] = []
    model = f"fake-{uuid.uuid4().hex[:8]}"
    with serve(pg_url, f"http://127.0.0.1:{port}/v1", **BREAKER) as server:
        try:
            codes = breaker_cycle(server, lambda: revived[0].stats["chat_completions"] if revived else 0,
                                  lambda: revived.append(FakeUpstream.start_in_thread(port=port)), model)
        finally:
            for fake in revived:
                fake.stop()
    assert codes == {"upstream_unreachable"}  # a refused connection is not a timeout


def test_the_fallback_upstream_answers_while_the_primary_is_down(pg_url, fake_upstream):
    with FakeUpstream.start_in_thread() as fallback, serve(pg_url, fake_upstream.base_url,
                                                           fallback_base_url=fallback.base_url, **BREAKER) as server:
        fake_upstream.configure(status=503)
        _, secret = new_key(server)
        with sdk(server, secret) as sdk_client:
            for i in range(6):  # six different questions: none is answered from the cache
                completion = sdk_client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"question {i}"}])
                assert completion.choices[0].message.content
        assert fake_upstream.stats["chat_completions"] == 3  # then its breaker opened and it was skipped
        assert fallback.stats["chat_completions"] == 6
        entries = log(server, RECORDED)
        assert [e["outcome"] for e in entries] == ["ok"] * 6
        assert {e["upstream"] for e in entries} == {f"fallback/{MODEL}"}


# -- a client that leaves -----------------------------------------------------------------------


def test_a_client_that_leaves_mid_stream_is_recorded_with_what_it_was_sent(server, fake_upstream):
    key_id, secret = new_key(server)
    fake_upstream.configure(stream_chunk_delay_ms=150)
    seen = []
    with httpx.Client(timeout=10) as raw:
        with raw.stream("POST", f"{server.base_url}/v1/chat/completions",
                        json={"model": MODEL, "messages": HELLO, "stream": True},
                        headers={"Authorization": f"Bearer {secret}"}) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("data: {"):
                    chunk = msgspec.json.decode(line[6:])
                    seen.append(chunk)
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        break  # the client has some words, and hangs up
    entry = wait_for(lambda: [e for e in log(server, RECORDED) if e["api_key_id"] == key_id],
                     what="the disconnected stream's ledger entry")
    assert len(entry) == 1
    entry = entry[0]
    assert entry["outcome"] == "client_disconnected" and entry["stream"] is True
    assert entry["completion_tokens"] > 0 and entry["total_tokens"] > entry["completion_tokens"]
    assert entry["upstream"] == f"primary/{MODEL}"


# -- operators' endpoints ------------------------------------------------------------------------


def test_health_ready_and_the_schema(server):
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    ready = httpx.get(f"{server.base_url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["checks"]["event_store"] == {"ok": True}
    schema = httpx.get(f"{server.base_url}/schema/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/v1/chat/completions" in paths and "post" in paths["/v1/chat/completions"]
    assert "/v1/models" in paths and "/admin/api-keys" in paths
