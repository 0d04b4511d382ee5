from __future__ import annotations

import pytest

from fila.adapters.fake_upstream import FakeUpstream
from tests.support import drop_created_schemas, new_pg_url, new_sqlite_url


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
