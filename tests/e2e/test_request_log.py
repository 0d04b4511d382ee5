"""The operator's log: ``fila serve`` writes one JSON summary line per request on stderr (not a
terminal), with the request id the client was given, and never a secret or a prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, new_pg_url

ADMIN = "admin-" + uuid.uuid4().hex
PROMPT = "the secret recipe is " + uuid.uuid4().hex     # must never reach the log


@pytest.fixture
def served(tmp_path: Path, fake_upstream):
    port, log = free_port(), tmp_path / "stderr.log"
    env = {**os.environ, "FILA_DATABASE_URL": new_pg_url(), "FILA_UPSTREAM_BASE_URL": fake_upstream.base_url,
           "OPENAI_API_KEY": "sk-upstream-" + uuid.uuid4().hex, "FILA_ADMIN_TOKEN": ADMIN,
           "FILA_EMBEDDED_PROJECTOR": "false", "FILA_LOG_LEVEL": "info"}
    env.pop("FILA_REDIS_URL", None)
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fila.cli", "serve", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        yield base, log, env["OPENAI_API_KEY"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def summaries(log: Path, count: int) -> list[dict]:
    """The log's request lines, once ``count`` of them are there (each is written after its answer)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        found = [line for line in lines if line.get("event") == "request"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_each_request_leaves_one_json_summary_line_and_no_secret_or_prompt(served):
    base, log, upstream_key = served
    issued = httpx.post(f"{base}/admin/api-keys", json={"name": "logged", "plan": "enterprise"},
                        headers={"Authorization": f"Bearer {ADMIN}"}).json()
    key_id, secret = issued["id"], issued["key"]
    auth = {"Authorization": f"Bearer {secret}"}
    body = {"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": PROMPT}]}

    plain = httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth)
    streamed = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=auth)
    malformed = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers=auth)
    wrong_key = "fila-sk-not-a-key-" + uuid.uuid4().hex
    unauthenticated = httpx.post(f"{base}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {wrong_key}", "x-request-id": "client-id.42"})
    oversized = httpx.post(f"{base}/v1/chat/completions", headers={**auth, "x-request-id": "x" * 129},
                           content=b'{"messages": ["' + b"a" * 2_000_000 + b'"]}')
    assert [r.status_code for r in (plain, streamed, malformed, unauthenticated, oversized)] == [200, 200, 400, 401, 413]
    assert unauthenticated.headers["x-request-id"] == "client-id.42"       # a sane id of the client's is kept
    assert len(oversized.headers["x-request-id"]) == 32                       # an unreasonable one is replaced

    lines = summaries(log, 5)
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == 5 == len(by_id)
    first = by_id[plain.headers["x-request-id"]]
    usage = plain.json()["usage"]
    assert first["api_key_id"] == key_id and first["model"] == "gpt-4.1-nano"
    assert (first["outcome"], first["status"], first["tokens"]) == ("ok", 200, usage["total_tokens"])
    assert first["latency_ms"] > 0 and first["entry_id"] and first["level"] == "info"
    assert by_id[streamed.headers["x-request-id"]]["outcome"] == "ok"
    assert by_id[malformed.headers["x-request-id"]]["status"] == 400
    assert by_id["client-id.42"]["status"] == 401 and by_id["client-id.42"]["api_key_id"] is None
    assert by_id[oversized.headers["x-request-id"]]["status"] == 413

    text = log.read_text()
    for never in (secret, PROMPT, upstream_key, ADMIN, wrong_key):
        assert never not in text
