"""The fake OpenAI upstream, driven over real HTTP by the official openai SDK (and raw aiohttp
where the bytes on the wire are the point). Each test starts its own fake on a free port."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import openai
import pytest

from fila.adapters.fake_upstream import FakeUpstream, FakeUpstreamThread

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the fake upstream"}]
# 4 per message + ceil(len/4) of its text, + 3 priming the reply
HELLO_PROMPT_TOKENS = (4 + math.ceil(14 / 4)) + (4 + math.ceil(30 / 4)) + 3
AUTH = {"Authorization": "Bearer sk-test"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def threaded() -> Iterator[FakeUpstreamThread]:
    with FakeUpstream.start_in_thread() as server:
        yield server


@pytest.fixture
def sync_client(threaded: FakeUpstreamThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=threaded.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


async def ask(client: openai.AsyncOpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return await client.chat.completions.create(**{"model": "gpt-4o-mini", "messages": HELLO, **kwargs})


# -- replies ---------------------------------------------------------------------------------


def test_plain_completion_is_deterministic_with_consistent_usage(
    threaded: FakeUpstreamThread, sync_client: openai.OpenAI
) -> None:
    first = sync_client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, seed=7)
    again = sync_client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, seed=7)
    other = sync_client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, seed=8)

    assert first.id.startswith("chatcmpl-") and first.id != again.id
    assert first.object == "chat.completion" and first.model == "gpt-4o-mini"
    assert first.system_fingerprint
    [choice] = first.choices
    assert (choice.index, choice.finish_reason, choice.message.role) == (0, "stop", "assistant")
    assert choice.message.refusal is None and choice.logprobs is None
    assert choice.message.content == again.choices[0].message.content
    assert choice.message.content != other.choices[0].message.content
    assert '"Say hello to the fake upstream".' in choice.message.content  # echoes the last user turn
    assert first.usage is not None
    assert first.usage.prompt_tokens == HELLO_PROMPT_TOKENS
    assert first.usage.completion_tokens == len(choice.message.content.split())
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_n_choices_differ_and_add_up(sync_client: openai.OpenAI) -> None:
    reply = sync_client.chat.completions.create(model="gpt-4.1-nano", messages=HELLO, n=2)
    single = sync_client.chat.completions.create(model="gpt-4.1-nano", messages=HELLO)

    assert [c.index for c in reply.choices] == [0, 1]
    first, second = (c.message.content for c in reply.choices)
    assert first == single.choices[0].message.content and first != second
    assert reply.usage.completion_tokens == len(first.split()) + len(second.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_truncates_with_finish_reason_length(sync_client: openai.OpenAI) -> None:
    full = sync_client.chat.completions.create(model="gpt-4o", messages=HELLO).choices[0].message.content
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        reply = sync_client.chat.completions.create(model="gpt-4o", messages=HELLO, **limit)
        [choice] = reply.choices
        assert choice.finish_reason == "length"
        assert choice.message.content == " ".join(full.split()[:3])
        assert reply.usage.completion_tokens == 3
    roomy = sync_client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=500)
    assert roomy.choices[0].finish_reason == "stop" and roomy.choices[0].message.content == full


async def test_stream_with_usage_reassembles_to_the_plain_content(client: openai.AsyncOpenAI) -> None:
    plain = await ask(client)
    stream = await ask(client, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[0].choices[0].delta.content == ""
    assert len(content_chunks) >= 4  # role, a few pieces, finish
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == plain.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in content_chunks)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


async def test_stream_wire_format(fake: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/chat/completions", json=body, headers=AUTH) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = (await response.read()).decode()

    assert raw.endswith("\n\ndata: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events)
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    assert all("usage" in chunk for chunk in chunks)
    assert [chunk["usage"] is None for chunk in chunks] == [True] * (len(chunks) - 1) + [False]

    async with aiohttp.ClientSession() as http:  # without include_usage: no usage key, no usage chunk
        body["stream_options"] = None
        async with http.post(f"{fake.base_url}/chat/completions", json=body, headers=AUTH) as response:
            events = (await response.read()).decode().split("\n\n")[:-2]
    assert all("usage" not in json.loads(event[len("data: ") :]) for event in events)
    assert len(events) == len(chunks) - 1


def test_models_list(sync_client: openai.OpenAI) -> None:
    models = sync_client.models.list()
    ids = [m.id for m in models.data]
    assert {"gpt-4.1-nano", "gpt-4.1-mini", "gpt-4o-mini", "gpt-4o"} <= set(ids)
    assert all(m.object == "model" and m.owned_by and m.created for m in models.data)
    assert sync_client.models.retrieve("fake-anything").id == "fake-anything"


# -- client errors ---------------------------------------------------------------------------


async def test_unknown_model_is_404_model_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await ask(client, model="gpt-9-imaginary")
    assert caught.value.code == "model_not_found"
    assert caught.value.body["type"] == "invalid_request_error"
    assert (await ask(client, model="fake-tiny")).model == "fake-tiny"


async def test_bad_bodies_are_400_in_openai_shape(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=openai.NOT_GIVEN)
    assert caught.value.param == "messages" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(client, messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(client, n=0)
    assert caught.value.param == "n"

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/chat/completions", data=b"{not json", headers=AUTH) as response:
            assert response.status == 400
            error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


async def test_missing_authorization_is_401(fake: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/chat/completions", json=body) as response:
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "invalid_request_error"
        async with http.get(f"{fake.base_url}/models") as response:
            assert response.status == 401
        async with http.post(f"{fake.base_url}/chat/completions", json=body, headers=AUTH) as response:
            assert response.status == 200


# -- knobs -----------------------------------------------------------------------------------


async def test_forced_status_at_construction_and_over_http() -> None:
    async with FakeUpstream(status=503) as fake:
        async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await ask(client)
            assert caught.value.status_code == 503
            assert caught.value.body["type"] == "server_error"

            async with aiohttp.ClientSession() as http:
                async with http.post(f"{fake.url}/_fake/config", json={"status": 429}) as response:
                    assert response.status == 200
            with pytest.raises(openai.RateLimitError):
                await ask(client, stream=True)

            async with aiohttp.ClientSession() as http:
                async with http.post(f"{fake.url}/_fake/config", json={"status": None}) as response:
                    assert response.status == 200
            assert (await ask(client)).choices


async def test_error_rate(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.configure(error_rate=1.0)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as caught:
            await ask(client)
        assert caught.value.status_code == 500

    fake.configure(error_rate=0.5)
    outcomes = []
    for _ in range(40):
        try:
            await ask(client)
            outcomes.append("ok")
        except openai.InternalServerError:
            outcomes.append("500")
    assert 5 < outcomes.count("500") < 35


async def test_latency_delays_answers(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    await ask(client)  # warm: connection open
    started = time.perf_counter()
    await ask(client)
    fast = time.perf_counter() - started
    fake.configure(latency_ms=300)
    started = time.perf_counter()
    await ask(client)
    slow = time.perf_counter() - started
    assert slow >= 0.3 and slow - fast >= 0.25


async def test_stream_chunk_delay(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.configure(stream_chunk_delay_ms=40)
    started = time.perf_counter()
    chunks = [chunk async for chunk in await ask(client, stream=True)]
    assert time.perf_counter() - started >= 0.04 * (len(chunks) - 1)


def test_hang_times_out_until_reset(threaded: FakeUpstreamThread, sync_client: openai.OpenAI) -> None:
    threaded.configure(hang=True)
    with pytest.raises(openai.APITimeoutError):
        sync_client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, timeout=0.5)
    threaded.reset()
    reply = sync_client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, timeout=2)
    assert reply.choices[0].message.content


async def test_drop_closes_the_connection(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    full = [chunk async for chunk in await ask(client, stream=True)]
    fake.configure(drop=True)
    with pytest.raises(openai.APIConnectionError):
        await ask(client)

    received = []
    with pytest.raises((openai.APIConnectionError, aiohttp.ClientError, OSError)):
        async for chunk in await ask(client, stream=True):
            received.append(chunk)
    assert 1 <= len(received) < len(full)


# -- control plane ---------------------------------------------------------------------------


async def test_stats_count_calls_by_kind(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    await ask(client)
    await ask(client)
    [_ async for _ in await ask(client, stream=True)]
    await client.models.list()
    with pytest.raises(openai.NotFoundError):
        await ask(client, model="nope")

    expected = {"chat_completions": 4, "streams": 1, "models": 1, "errors": 1}
    assert fake.stats == expected
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake.url}/_fake/stats") as response:
            assert await response.json() == expected


async def test_reset_clears_knobs_and_counters(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.configure(status=500, latency_ms=5)
    with pytest.raises(openai.InternalServerError):
        await ask(client)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.url}/_fake/reset") as response:
            assert response.status == 200
    assert fake.stats == {"chat_completions": 0, "streams": 0, "models": 0, "errors": 0}
    assert fake.knobs.status is None and fake.knobs.latency_ms == 0
    assert (await ask(client)).choices


async def test_config_rejects_unknown_or_invalid_knobs(fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http:
        for bad in ({"latency": 5}, {"error_rate": 2}, {"status": "soon"}):
            async with http.post(f"{fake.url}/_fake/config", json=bad) as response:
                assert response.status == 400, bad
    assert fake.knobs.error_rate == 0
    with pytest.raises(ValueError):
        fake.configure(bogus=True)


def test_thread_runner_stops_listening() -> None:
    server = FakeUpstream.start_in_thread(latency_ms=1)
    url = f"{server.base_url}/models"
    with urllib.request.urlopen(urllib.request.Request(url, headers=AUTH), timeout=2) as response:
        assert json.load(response)["object"] == "list"
    assert server.stats["models"] == 1
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(urllib.request.Request(url, headers=AUTH), timeout=2)


def test_main_runs_standalone() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "fila.adapters.fake_upstream", "--port", "0", "--latency-ms", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        base_url = line.split()[-1]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with urllib.request.urlopen(urllib.request.Request(f"{base_url}/models", headers=AUTH), timeout=5) as response:
            assert json.load(response)["object"] == "list"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
