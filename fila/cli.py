"""The ``fila`` command: serve, keys, fake-upstream (and, as they land, seed, projections, audit)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

from fila.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace | None = None, **overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as error:
        print(f"fila: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


async def _with_container(settings: Settings, work: Callable[[Any], Any], *, seed: bool = True) -> Any:
    from fila.bootstrap import build_container

    container = build_container(settings)
    container.batcher.start()
    try:
        await container.batcher.run(container.registry.catch_up)
        if seed and not container.plans.by_slug:
            await container.plan_service.seed()
        return await work(container)
    finally:
        await asyncio.to_thread(container.batcher.close)
        await container.primary.close()
        container.projections_db.close()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fila.bootstrap import configure_logging

    settings = _settings(host=args.host, port=args.port, workers=args.workers)
    configure_logging(settings)
    demo = settings.uses_fake_upstream
    if demo:
        from fila.adapters.fake_upstream import FakeUpstream

        fake = FakeUpstream.start_in_thread()
        os.environ["FILA_UPSTREAM_BASE_URL"] = fake.base_url
        os.environ["OPENAI_API_KEY"] = "fila-demo"
    generated_token = settings.admin_token is None
    if generated_token:
        os.environ["FILA_ADMIN_TOKEN"] = "fila-admin-" + secrets.token_urlsafe(18)
    settings = _settings(host=args.host, port=args.port, workers=args.workers)
    if demo:
        record, secret = asyncio.run(_with_container(
            settings, lambda c: c.issue_key("demo", "demo", None)))
        _print_demo(settings, secret, fake.base_url)
    elif generated_token:
        print(f"FILA_ADMIN_TOKEN is unset; admin token for this run: {settings.admin_token}", flush=True)
    uvicorn.run("fila.bootstrap:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers if settings.workers > 1 else None, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    return 0


def _print_demo(settings: Settings, secret: str, upstream: str) -> None:
    base = f"http://{settings.host}:{settings.port}"
    print(f"""
FILA is starting on {base} (event store: {settings.database_url}; no OPENAI_API_KEY, so the built-in fake upstream at {upstream})
admin token: {settings.admin_token}
demo API key: {secret}

  curl {base}/v1/chat/completions -H "Authorization: Bearer {secret}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "{settings.default_model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key="{secret}"); \\
print(c.chat.completions.create(model="{settings.default_model}", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'
""", flush=True)


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = _settings()
    record, secret = asyncio.run(_with_container(settings, lambda c: c.issue_key(args.name, args.owner, args.plan)))
    print(json.dumps(dict(record.to_public(), key=secret), indent=2))
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    created = asyncio.run(_with_container(_settings(), lambda c: c.plan_service.seed(), seed=False))
    print("created plans: " + (", ".join(created) if created else "none (all default plans exist)"))
    return 0


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    from fila.adapters import fake_upstream

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.latency_ms:
        argv += ["--latency-ms", str(args.latency_ms)]
    return fake_upstream.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fila", description="FILA: an LLM gateway with an auditable ledger")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="issue an API key and print its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--owner")
    create.add_argument("--plan")
    create.set_defaults(func=cmd_keys_create)

    seed = sub.add_parser("seed", help="create the default plans (Free, Basic, Pro, Enterprise); idempotent")
    seed.set_defaults(func=cmd_seed)

    fake = sub.add_parser("fake-upstream", help="run the fake OpenAI upstream (tests, demos, benchmarks)")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8081)
    fake.add_argument("--latency-ms", type=float, default=0.0)
    fake.set_defaults(func=cmd_fake_upstream)

    from fila.projections import cli as projections_cli
    from fila.services import audit_cli

    projections_cli.add_subcommands(sub)
    audit_cli.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
