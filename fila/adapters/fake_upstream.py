"""A fake OpenAI upstream: a real aiohttp server speaking OpenAI's chat wire format.

Used by FILA's tests, demos and benchmarks (it is the baseline, so the handler stays lean).
Routes: `POST /v1/chat/completions` (plain and SSE), `GET /v1/models[/{id}]`, and the control
plane `POST /_fake/config`, `GET /_fake/stats`, `POST /_fake/reset`. Replies are deterministic
(see fake_replies). Knobs (Knobs below) are set at construction, with `configure()`, or over HTTP.

Order of a chat call: counted -> 401 without Authorization -> hang -> latency -> forced status
-> error_rate -> 400 bad body -> 404 unknown model -> drop -> answer.

    async with FakeUpstream(latency_ms=5) as fake:   # on the running loop
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test")
    with FakeUpstream.start_in_thread() as fake:     # own loop, daemon thread, for sync code
        fake.configure(status=503)
    python -m fila.adapters.fake_upstream --port 8081 --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web

from fila.adapters import fake_replies as replies

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Knobs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # slept before answering a chat call
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0  # fraction answered 500
    status: Annotated[int, msgspec.Meta(ge=400, le=599)] | None = None  # forced error status
    hang: bool = False  # accept chat calls and answer nothing until hang is cleared or reset
    drop: bool = False  # close the connection without a response (streams: after 2 chunks)
    stream_chunk_delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0


def _zero_stats() -> dict[str, int]:
    return {"chat_completions": 0, "streams": 0, "models": 0, "errors": 0}


class FakeUpstream:
    """The fake server; an async context manager that listens on the running loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.host, self.port = host, port
        self._release = asyncio.Event()  # set = no hang in force
        self._release.set()
        self._knobs = Knobs()
        self._set_knobs(msgspec.convert(knobs, Knobs))
        self._stats = _zero_stats()
        self._rng = random.Random(0)
        self._stopping = False
        self._ids = itertools.count(1)
        self._tag = os.urandom(3).hex()
        self._encode = msgspec.json.Encoder().encode
        self._decode_chat = msgspec.json.Decoder(replies.ChatRequest).decode
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_post("/_fake/config", self._http_config)
        app.router.add_get("/_fake/stats", self._http_stats)
        app.router.add_post("/_fake/reset", self._http_reset)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, backlog=1024).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._stopping = True
        self._release.set()  # hung handlers wake up and drop their connection
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @classmethod
    def start_in_thread(cls, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> FakeUpstreamThread:
        """Start on a private loop in a daemon thread; returns once listening."""
        fake = cls(host, port, **knobs)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
        thread.start()
        handle = FakeUpstreamThread(fake, loop, thread)
        try:
            asyncio.run_coroutine_threadsafe(fake.start(), loop).result(timeout=10)
        except BaseException:
            handle.stop()
            raise
        return handle

    # -- in-process control ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def configure(self, **knobs: Any) -> Knobs:
        """Change any subset of the knobs; raises msgspec.ValidationError (a ValueError) if bad."""
        self._set_knobs(msgspec.convert({**msgspec.structs.asdict(self._knobs), **knobs}, Knobs))
        return self._knobs

    def reset(self) -> None:
        """Default knobs (releasing hung calls), zero counters, error_rate's dice rewound."""
        self._set_knobs(Knobs())
        self._stats = _zero_stats()
        self._rng = random.Random(0)

    def _set_knobs(self, knobs: Knobs) -> None:
        if knobs.hang and self._release.is_set():
            self._release = asyncio.Event()
        elif not knobs.hang:
            self._release.set()
        self._knobs = knobs

    # -- OpenAI routes -----------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._stats["chat_completions"] += 1
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return self._error(401, replies.NO_KEY, "invalid_request_error")
        req = replies.parse_chat(self._decode_chat, await request.read())
        if isinstance(req, replies.ChatRequest) and req.stream:
            self._stats["streams"] += 1

        knobs = self._knobs
        if knobs.hang:
            await self._release.wait()
            if self._stopping:
                return self._drop(request)
            knobs = self._knobs
        if knobs.latency_ms:
            await asyncio.sleep(knobs.latency_ms / 1000)
        if knobs.status is not None:
            return self._forced(knobs.status)
        if knobs.error_rate and self._rng.random() < knobs.error_rate:
            return self._forced(500)
        if not isinstance(req, replies.ChatRequest):
            message, param, code = req
            return self._error(400, message, "invalid_request_error", param, code)
        if not replies.is_known_model(req.model):
            return self._model_not_found(req.model)
        if knobs.drop and not req.stream:
            return self._drop(request)
        choices, usage = replies.answer(req)
        number = next(self._ids)
        head = {"id": f"chatcmpl-fake{self._tag}{number:010d}", "created": int(time.time()), "model": req.model}
        headers = {"x-request-id": f"req_fake{self._tag}{number:010d}"}
        if req.stream:
            chunks = replies.chunks(head, choices, usage, req.stream_options)
            return await self._stream(request, chunks, knobs, headers)
        body = self._encode(replies.completion(head, choices, usage))
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _stream(
        self, request: web.Request, chunks: list[dict[str, Any]], knobs: Knobs, headers: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        await response.prepare(request)
        delay = knobs.stream_chunk_delay_ms / 1000
        try:
            for sent, payload in enumerate(chunks):
                if knobs.drop and sent == 2:
                    self._drop(request)
                    return response
                if delay and sent:
                    await asyncio.sleep(delay)
                await response.write(b"data: " + self._encode(payload) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client went away mid-stream
            pass
        return response

    async def _models(self, request: web.Request) -> web.Response:
        self._stats["models"] += 1
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return self._error(401, replies.NO_KEY, "invalid_request_error")
        data = [replies.model_object(model) for model in replies.LISTED_MODELS]
        return web.Response(body=self._encode({"object": "list", "data": data}), content_type="application/json")

    async def _model(self, request: web.Request) -> web.Response:
        self._stats["models"] += 1
        model = request.match_info["model"]
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return self._error(401, replies.NO_KEY, "invalid_request_error")
        if not replies.is_known_model(model):
            return self._model_not_found(model)
        return web.Response(body=self._encode(replies.model_object(model)), content_type="application/json")

    # -- errors ------------------------------------------------------------------------------
    def _error(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ) -> web.Response:
        self._stats["errors"] += 1
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        headers = {"retry-after": "1"} if status == 429 else None
        return web.Response(status=status, body=self._encode(body), content_type="application/json", headers=headers)

    def _forced(self, status: int) -> web.Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        message, type_, code = replies.STATUS_ERRORS.get(status, (f"Fake upstream forced HTTP {status}.", kind, None))
        return self._error(status, message, type_, None, code)

    def _model_not_found(self, model: str) -> web.Response:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return self._error(404, message, "invalid_request_error", None, "model_not_found")

    def _drop(self, request: web.Request) -> web.Response:
        """Abort the TCP connection; aiohttp then fails quietly to write the dummy response."""
        self._stats["errors"] += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    # -- control plane -----------------------------------------------------------------------
    async def _http_config(self, request: web.Request) -> web.Response:
        try:
            patch = msgspec.json.decode(await request.read(), type=dict[str, Any])
            knobs = self.configure(**patch)
        except (msgspec.DecodeError, ValueError) as exc:  # ValidationError is a ValueError
            body = {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}}
            return web.Response(status=400, body=self._encode(body), content_type="application/json")
        return web.Response(body=self._encode(knobs), content_type="application/json")

    async def _http_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=self._encode(self._stats), content_type="application/json")

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=self._encode({"reset": True}), content_type="application/json")


class FakeUpstreamThread:
    """Handle on a FakeUpstream running on its own loop in a daemon thread."""

    def __init__(self, fake: FakeUpstream, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.fake, self._loop, self._thread = fake, loop, thread

    @property
    def url(self) -> str:
        return self.fake.url

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    @property
    def stats(self) -> dict[str, int]:
        return self._call(lambda: self.fake.stats)

    def configure(self, **knobs: Any) -> Knobs:
        return self._call(lambda: self.fake.configure(**knobs))

    def reset(self) -> None:
        self._call(self.fake.reset)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FakeUpstreamThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (knobs and hang events belong to it) and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)


async def _serve(host: str, port: int, knobs: dict[str, Any]) -> None:
    async with FakeUpstream(host, port, **knobs) as fake:
        print(f"fake OpenAI upstream listening on {fake.base_url}", flush=True)
        stop = asyncio.Event()
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fila.adapters.fake_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    knobs = {"latency_ms": args.latency_ms, "error_rate": args.error_rate}
    try:
        msgspec.convert(knobs, Knobs)
    except msgspec.ValidationError as exc:
        parser.error(str(exc))
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(_serve(args.host, args.port, knobs))
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
