"""Shared pieces of the benchmarks: processes on loopback, wrk, a paced client, RSS, the machine.

Every load here goes to 127.0.0.1 only, is bounded in time, and stops by itself.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.platform()} | {os.cpu_count()} cores | {cpu} | Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def fresh_database() -> str:
    name = "fila_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None, port: int | None = None) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        if port is not None:
            wait_port(port)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def fake_upstream(port: int, latency_ms: float = 0.0):
    return process([sys.executable, "-m", "fila.adapters.fake_upstream", "--port", str(port),
                    "--latency-ms", str(latency_ms)], port=port)


def uvicorn_app(port: int, factory: str, env: dict[str, str], workers: int = 2):
    """An ASGI app factory under uvicorn with the flags every bench uses (uvloop, httptools)."""
    return process([sys.executable, "-m", "uvicorn", "--factory", factory,
                    "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                    "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
                   env={"FILA_LOG_LEVEL": "warning", **env}, port=port)


def fila_server(port: int, env: dict[str, str], workers: int = 2):
    return uvicorn_app(port, "fila.bootstrap:app_from_env", env, workers)


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak RSS) over a process and its children."""
    total = 0
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
{extra}
"""


def wrk(url: str, body: dict, key: str, *, connections: int = 64, seconds: int = 10,
        threads: int = 2, headers: dict[str, str] | None = None, delay_ms: float = 0) -> dict:
    """Drive ``url`` with wrk; with ``delay_ms``, each connection waits that long between its
    requests (wrk times each request from its send, so the pause is not counted)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    script = WRK_LUA.format(body=json.dumps(json.dumps(body)), key=key, extra=extra)
    if delay_ms:
        script += f"\ndelay = function() return {delay_ms:g} end\n"
    script += """
response = function(status, headers, body)
  if status ~= 200 and not reported then reported = true; io.write("FILA-NON2XX " .. status .. " " .. body .. "\\n") end
end
done = function(summary, latency, requests)
  io.write(string.format("FILA-WRK %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "--timeout", "10s", "-s", handle.name, url], capture_output=True, text=True).stdout
    os.unlink(handle.name)
    match = re.search(r"FILA-WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not match:
        raise RuntimeError(f"wrk said: {out}")
    requests, duration_us, p50, p99, bad_status, socket_errors = map(int, match.groups())
    for line in out.splitlines():
        if line.startswith("FILA-NON2XX"):
            print(f"  (wrk saw a non-2xx answer: {line[12:200]})")
    return {"requests": requests, "rps": requests / (duration_us / 1e6), "p50_ms": p50 / 1000,
            "p99_ms": p99 / 1000, "non_2xx": bad_status, "socket_errors": socket_errors}


def paced(url: str, body: dict, key: str, *, rate: float = 50, seconds: float = 8,
          headers: dict[str, str] | None = None) -> dict:
    """One client at a steady light rate: the latency a lone request sees. wrk on one connection
    pausing between requests, so the client's own cost is a C client's, the same for every run."""
    wrk(url, body, key, connections=1, threads=1, seconds=1, headers=headers, delay_ms=1000 / rate)  # warm
    result = wrk(url, body, key, connections=1, threads=1, seconds=int(seconds), headers=headers,
                 delay_ms=1000 / rate)
    if result["non_2xx"] or result["socket_errors"]:
        raise RuntimeError(f"light-load run had failures: {result}")
    return result


def count_events(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM fila_events").fetchone()[0]


def create_key(base_url: str, admin_token: str, plan: str = "enterprise") -> str:
    import httpx

    response = httpx.post(f"{base_url}/admin/api-keys", json={"name": f"bench-{uuid.uuid4().hex[:6]}", "plan": plan},
                          headers={"authorization": f"Bearer {admin_token}"}, timeout=30)
    response.raise_for_status()
    return response.json()["key"]


def row(label: str, result: dict) -> str:
    parts = [f"{label:<44}"]
    if "rps" in result:
        parts.append(f"{result['rps']:>9,.0f} req/s")
    parts.append(f"p50 {result['p50_ms']:>7.2f} ms  p99 {result['p99_ms']:>7.2f} ms")
    if result.get("non_2xx") or result.get("socket_errors"):
        parts.append(f"non-2xx {result['non_2xx']} socket errors {result['socket_errors']}")
    return "  ".join(parts)
