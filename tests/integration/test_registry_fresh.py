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


def test_an_admin_write_through_one_process_is_read_at_once_through_another(pg_url):
    """A plan created through server A is usable by the very next admin call to server B."""
    import httpx

    from fila.adapters.fake_upstream import FakeUpstream
    from fila.config import load_settings
    from tests.support import running_fila

    with FakeUpstream.start_in_thread() as fake:
        settings = load_settings({}, database_url=pg_url, upstream_base_url=fake.base_url,
                                 openai_api_key="x", admin_token="adm", embedded_projector=False)
        with running_fila(settings) as a, running_fila(settings) as b:
            auth = {"authorization": "Bearer adm"}
            slug = f"p-{uuid4().hex[:8]}"
            made = httpx.post(f"{a.base_url}/admin/plans", json={"slug": slug, "name": "P"}, headers=auth)
            assert made.status_code == 201, made.text
            key = httpx.post(f"{b.base_url}/admin/api-keys", json={"name": "k", "plan": slug}, headers=auth)
            assert key.status_code == 201, key.text


async def test_a_key_whose_assignment_lands_after_this_process_read_the_key_is_admitted(database_url):
    """Issuing a key with a plan is two commits (the key, then its assignment). A process whose
    poll ran between them knows the key but not its plan: admission reads the log once more
    rather than answer 403 no_active_plan until the next poll."""
    from types import SimpleNamespace

    from fila.domain.plans import Assignment, Plan, assignment_id_for
    from fila.projections.planbook import PlanBook
    from fila.services.admission import CycleTokens, PlanAdmission

    writer = open_store(database_url)
    second = open_store(database_url)
    other = Registry(second.recorder, interval=3600)      # the poll never runs by itself here
    book = PlanBook().attach(other)
    reads = 0

    async def refresh() -> None:
        nonlocal reads
        reads += 1
        await other.refresh(_run)

    admission = PlanAdmission(book, None, CycleTokens(None), refresh=refresh)
    now = datetime.now(UTC)
    plan = Plan.define(f"p-{uuid4().hex[:8]}", {"name": "P", "included_tokens": 1000}, now)
    key_id, secret = uuid4(), f"fila-sk-{uuid4().hex}"
    writer.save(plan, ApiKey.issue(key_id, "fresh", "owner", secret, now))
    other.catch_up()                                          # the poll ran here: key, no plan yet
    key = other.authenticate(hash_secret(secret))
    assert key is not None and book.current_assignment(key.id) is None
    writer.save(Assignment.assign(assignment_id_for(str(key_id), 0), str(key_id), str(plan.id), now, None, now))

    admitted = await admission.admit(key, SimpleNamespace(), datetime.now(UTC))
    assert admitted.plan_id == str(plan.id) and reads == 1
