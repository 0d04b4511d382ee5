from __future__ import annotations

import pytest

from fila.adapters.fake_upstream import FakeUpstream
from tests.support import REDIS_URL, drop_created_schemas, new_pg_url, new_sqlite_url


def pytest_sessionfinish(session, exitstatus):
    """Each test made its own schema; leave the shared test database as it was found."""
    try:
        drop_created_schemas()
    except Exception as error:  # cleanup must never turn a green run red
        print(f"(could not drop the test schemas: {error})")


@pytest.fixture
def fake_upstream():
    handle = FakeUpstream.start_in_thread()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """Each application test runs on both event-store backends."""
    return new_sqlite_url(tmp_path) if request.param == "sqlite" else new_pg_url()


@pytest.fixture
def pg_url():
    return new_pg_url()


@pytest.fixture(scope="session")
def redis_server():
    """The machine's Redis, which the Redis tests need as they need PostgreSQL: a run without it
    fails here, saying so, rather than skipping them and passing (.ci/run starts it)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except redis.RedisError as error:
        pytest.fail(f"these tests need Redis at {REDIS_URL} ({error}); start it as .ci/run does", pytrace=False)
    return REDIS_URL
