"""A key issued by one FILA process authenticates at once in another (no wait for the poll)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import uuid4

from fila.adapters.eventstore import open_store
from fila.domain.apikey import ApiKey, hash_secret
from fila.projections.registry import Registry


async def _run(fn, *args):
    return await asyncio.to_thread(fn, *args)


async def test_a_key_issued_elsewhere_authenticates_at_once(database_url):
    writer = open_store(database_url)
    second = open_store(database_url)                      # a second process...
    other = Registry(second.recorder, interval=3600)       # ...whose poll never runs in this test
    other.catch_up()
    secret = f"fila-sk-{uuid4().hex}"
    writer.save(ApiKey.issue(uuid4(), "fresh", "owner", secret, datetime.now(UTC)))

    assert other.authenticate(hash_secret(secret)) is None          # the poll has not run
    record = await other.authenticate_fresh(hash_secret(secret), _run)
    assert record is not None and record.name == "fresh"


async def test_unknown_secrets_refresh_at_most_once_per_interval(database_url):
    store = open_store(database_url)
    registry = Registry(store.recorder)
    registry.catch_up()
    reads = 0

    async def counting_run(fn, *args):
        nonlocal reads
        reads += 1
        return await asyncio.to_thread(fn, *args)

    results = await asyncio.gather(*[registry.authenticate_fresh(hash_secret(f"wrong-{i}"), counting_run)
                                     for i in range(50)])
    assert results == [None] * 50
    assert reads == 1
