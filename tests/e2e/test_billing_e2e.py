"""End to end: the official openai SDK (max_retries=0) against a running FILA on PostgreSQL with the
fake upstream, its embedded projector following the log.

A key on a plan like Basic (but with 100 included tokens and prices that make cents) goes past its
allowance; its cycle shows the overage with exact amounts (checked against a computation of its
own from the usage log); the client sees the same in ``GET /v1/usage``; a retry with the same
Idempotency-Key is one row of the usage log and one request on the bill; once the cycle's period
has ended it is closed, marked billed and paid, each transition visible at once.

The assignment starts a month minus a few seconds ago, so its first cycle ends seconds after the
requests (the test waits for that moment of wall time; never for a projection).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import openai
import pytest

from fila.adapters.fake_upstream import FakeUpstream
from fila.config import load_settings
from fila.domain.cycles import add_months
from fila.domain.time import iso, parse_iso
from tests.support import ServerHandle, running_fila

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "gpt-4.1-nano"
INPUT_PRICE, OUTPUT_PRICE = Fraction(2000), Fraction(8000)        # per million tokens: $0.002 and $0.008 each
PLAN = {"name": "Basic (small)", "monthly_price_minor": 1_900, "included_tokens": 100,
        "input_price_per_million": "2000", "output_price_per_million": "8000",
        "cache_hit_billing": "fraction", "cache_hit_fraction": "0.5"}
SECONDS_LEFT = 6


@pytest.fixture
def server(pg_url: str) -> Iterator[ServerHandle]:
    with FakeUpstream.start_in_thread() as fake:
        settings = load_settings({}, database_url=pg_url, upstream_base_url=fake.base_url,
                                 openai_api_key="sk-upstream", admin_token=ADMIN, log_level="warning")
        with running_fila(settings) as handle:
            yield handle


def admin(server: ServerHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}", "X-Fila-Actor": "e2e-admin"}
    return httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=15, **kwargs)


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if "json" in response.headers.get("content-type", "") else response.text


def cents(amount: Fraction) -> int:
    """Half-up to cents, once (the README's rounding rule), for non-negative amounts."""
    return int(amount * 100 + Fraction(1, 2))


def anchor_ending_soon(now: datetime) -> tuple[datetime, int]:
    """An anchor and the index of its cycle that holds ``now`` and ends a few seconds later.

    Usually cycle 0 of an anchor a month ago; on a 31st after a shorter month (or 29-31 March)
    no anchor's first cycle ends then, but a later cycle of an anchor on an earlier 31st does.
    """
    target = now + timedelta(seconds=SECONDS_LEFT)
    for days in range(27, 95):
        start = target - timedelta(days=days)
        for index in range(3):
            if add_months(start, index) <= now and add_months(start, index + 1) == target:
                return start, index
    raise AssertionError(f"no anchor has a cycle ending at {target}")


def expected_bill(entries: list[dict[str, Any]]) -> dict[str, int]:
    """The bill of these usage-log rows, computed here from the README's rules."""
    left, over_in, over_out = 100, 0, 0
    for e in sorted(entries, key=lambda e: e["notification_id"]):
        if e["outcome"] not in ("ok", "client_disconnected"):
            continue
        hit = e["cache"] == "hit"
        bill_in = e["prompt_tokens"] // 2 if hit else e["prompt_tokens"]
        bill_out = e["completion_tokens"] // 2 if hit else e["completion_tokens"]
        inc_in = min(bill_in, left)
        inc_out = min(bill_out, left - inc_in)
        left -= inc_in + inc_out
        over_in += bill_in - inc_in
        over_out += bill_out - inc_out
    in_minor = cents(over_in * INPUT_PRICE / 1_000_000)
    out_minor = cents(over_out * OUTPUT_PRICE / 1_000_000)
    return {"overage_input_tokens": over_in, "overage_output_tokens": over_out, "base_minor": 1_900,
            "overage_input_minor": in_minor, "overage_output_minor": out_minor,
            "total_minor": 1_900 + in_minor + out_minor}


def test_a_key_past_its_allowance_is_billed_exactly_and_its_cycle_closes_bills_and_gets_paid(server):
    slug = f"basic-small-{uuid.uuid4().hex[:6]}"
    ok(admin(server, "POST", "/admin/plans", json={"slug": slug, **PLAN}), 201)
    key = ok(admin(server, "POST", "/admin/api-keys", json={"name": "billing-e2e", "plan": slug}), 201)
    # re-anchor the key: its first cycle ends seconds from now
    [first] = ok(admin(server, "GET", f"/admin/api-keys/{key['id']}/assignments"))["items"]
    ok(admin(server, "POST", f"/admin/assignments/{first['id']}/cancel", json={"reason": "re-anchored"}))
    start, index = anchor_ending_soon(datetime.now(UTC))
    assignment = ok(admin(server, "POST", "/admin/assignments",
                          json={"api_key_id": key["id"], "plan": slug, "starts_at": iso(start)}), 201)

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key["key"], max_retries=0, timeout=15)
    story = "Tell me about the billing of large language model gateways in some detail please. " * 3
    for i in range(3):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"{i}: {story}"}])
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"0: {story}"}])  # a repeat
    retry_key = uuid.uuid4().hex
    original = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"retried: {story}"}],
        extra_headers={"Idempotency-Key": retry_key})
    replayed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"retried: {story}"}],
        extra_headers={"Idempotency-Key": retry_key})
    assert replayed.headers.get("idempotent-replayed") == "true"
    assert replayed.parse().id == original.parse().id

    # the usage log: five requests, the retried one once
    log = ok(admin(server, "GET", "/admin/usage", params={"api_key_id": key["id"], "order": "asc"}))["items"]
    assert len(log) == 5 and len({e["entry_id"] for e in log}) == 5
    expected = expected_bill(log)
    assert expected["overage_input_tokens"] + expected["overage_output_tokens"] > 0
    csv_report = ok(admin(server, "GET", "/admin/usage/report", params={"api_key_id": key["id"]}))
    assert len(csv_report.strip().splitlines()) == 1 + 5
    per_key = ok(admin(server, "GET", "/admin/usage/stats", params={"group_by": "api_key",
                                                                   "api_key_id": key["id"]}))["items"]
    assert per_key[0]["requests"] == 5

    # the cycle, listed by key: exact amounts
    cycles = ok(admin(server, "GET", "/admin/billing/cycles", params={"api_key_id": key["id"]}))["items"]
    [cycle] = [c for c in cycles if c["assignment_id"] == assignment["id"] and c["cycle_index"] == index]
    assert parse_iso(cycle["starts_at"]) == add_months(start, index)
    assert cycle["status"] == "open" and cycle["requests"] == 5
    assert {k: cycle[k] for k in expected} == expected
    assert cycle["input_tokens"] == sum(e["prompt_tokens"] for e in log)
    assert cycle["overage_tokens"] == expected["overage_input_tokens"] + expected["overage_output_tokens"]
    assert cycle["amounts"]["total"]["amount"] == f"{expected['total_minor'] // 100}.{expected['total_minor'] % 100:02d}"

    # the client sees its current cycle too, and so does the admin per key
    mine = httpx.get(f"{server.base_url}/v1/usage", headers={"Authorization": f"Bearer {key['key']}"},
                     timeout=15).json()
    assert (mine["included_tokens"], mine["remaining_tokens"], mine["cycle"]["id"]) == (100, 0, cycle["id"])
    assert mine["overage_tokens"] == cycle["overage_tokens"] and mine["used_tokens"] == 100 + mine["overage_tokens"]
    assert mine["overage_amount"]["amount_minor"] == expected["overage_input_minor"] + expected["overage_output_minor"]
    assert ok(admin(server, "GET", f"/admin/api-keys/{key['id']}/usage"))["amount_so_far"]["amount_minor"] == \
        expected["total_minor"]

    # closing before the period ends is refused; after it, close -> billed -> paid, each seen at once
    refused = admin(server, "POST", f"/admin/billing/cycles/{cycle['id']}/close")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "invalid_transition"
    while datetime.now(UTC) < parse_iso(cycle["ends_at"]):
        time.sleep(0.05)                                  # wall time, not a projection
    closed = ok(admin(server, "POST", f"/admin/billing/cycles/{cycle['id']}/close"))
    assert (closed["status"], closed["closed_by"]) == ("closed", "e2e-admin")
    assert ok(admin(server, "GET", f"/admin/billing/cycles/{cycle['id']}"))["status"] == "closed"
    again = admin(server, "POST", f"/admin/billing/cycles/{cycle['id']}/close")
    assert again.status_code == 409
    early = admin(server, "POST", f"/admin/billing/cycles/{cycle['id']}/mark-paid")
    assert early.status_code == 409
    billed = ok(admin(server, "POST", f"/admin/billing/cycles/{cycle['id']}/mark-billed", json={"reference": "INV-7"}))
    assert (billed["status"], billed["billed_minor"]) == ("billed", expected["total_minor"])
    listed = ok(admin(server, "GET", "/admin/billing/cycles", params={"api_key_id": key["id"], "status": "billed"}))
    assert [c["id"] for c in listed["items"]] == [cycle["id"]]
    paid = ok(admin(server, "POST", f"/admin/billing/cycles/{cycle['id']}/mark-paid", json={"reference": "wire"}))
    assert (paid["status"], paid["paid_by"], paid["paid_reference"]) == ("paid", "e2e-admin", "wire")
    assert [line["kind"] for line in paid["lines"]][:1] == ["base"]
    assert sum(line["amount_minor"] for line in paid["lines"]) == expected["total_minor"]

    # a request now belongs to the next cycle: the paid one never changes
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next cycle"}])
    after = ok(admin(server, "GET", f"/admin/billing/cycles/{cycle['id']}"))
    assert {k: after[k] for k in expected} == expected and after["requests"] == 5 and after["late_requests"] == 0
    ours = ok(admin(server, "GET", "/admin/billing/cycles", params={"assignment_id": assignment["id"]}))["items"]
    assert sorted(c["cycle_index"] for c in ours) == list(range(index + 2))

    report = ok(admin(server, "GET", "/admin/billing/cycles/report",
                      params={"api_key_id": key["id"], "format": "csv"}))
    assert cycle["id"] in report and str(expected["total_minor"]) in report
    stats = ok(admin(server, "GET", "/admin/billing/cycles/stats"))
    assert stats["cycles_by_status"]["paid"] == 1
