"""/admin/plans and /admin/assignments over real HTTP: a FILA server on PostgreSQL, the fake upstream.

One server (one schema) serves the module; each test makes its own slugs and keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fila.adapters.fake_upstream import FakeUpstream
from fila.config import load_settings
from tests.support import new_pg_url, running_fila

ADMIN = "admin-token-for-tests"


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with FakeUpstream.start_in_thread() as fake:
        settings = load_settings({}, database_url=new_pg_url(), upstream_base_url=fake.base_url,
                                 openai_api_key="sk-upstream", admin_token=ADMIN)
        with running_fila(settings) as handle:
            yield handle


@pytest.fixture(scope="module")
def admin(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as client:
        yield client


def slug() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


def refused(response: httpx.Response, status: int, field: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    if code is not None:
        assert error["code"] == code, error
    return error


def new_plan(admin: httpx.Client, **terms: Any) -> dict:
    response = admin.post("/admin/plans", json={"slug": slug(), "name": "Test plan", **terms})
    assert response.status_code == 201, response.text
    return response.json()


def new_key(admin: httpx.Client, plan: str) -> dict:
    response = admin.post("/admin/api-keys", json={"name": "k", "plan": plan})
    assert response.status_code == 201, response.text
    return response.json()


def assignment_of(admin: httpx.Client, key_id: str) -> dict:
    items = admin.get(f"/admin/api-keys/{key_id}/assignments").json()["items"]
    return items[-1]


def walk(admin: httpx.Client, path: str, limit: int, **params: str) -> list[dict]:
    items, cursor, pages = [], None, 0
    while True:
        query = dict(params, limit=str(limit), **({"cursor": cursor} if cursor else {}))
        body = admin.get(path, params=query).json()
        assert len(body["items"]) <= limit
        items += body["items"]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            return items
        assert pages < 1000


# -- plans -----------------------------------------------------------------------------------------


def test_plan_crud_by_id_and_by_slug(admin: httpx.Client) -> None:
    name = slug()
    created = admin.post("/admin/plans", json={"slug": name, "name": "Small", "monthly_price_minor": 500,
                                               "included_tokens": 1000, "requests_per_minute": 10,
                                               "input_price_per_million": "0.5"})
    assert created.status_code == 201, created.text
    plan = created.json()
    assert plan["slug"] == name and plan["included_tokens"] == 1000 and plan["requests_per_minute"] == 10
    assert plan["requests_per_hour"] is None and plan["requests_per_day"] is None
    assert plan["tokens_per_minute"] is None and plan["active"] is True
    assert plan["input_price_per_million"] == "0.50"
    assert admin.get(f"/admin/plans/{plan['id']}").json() == plan == admin.get(f"/admin/plans/{name}").json()

    updated = admin.patch(f"/admin/plans/{name}", json={"included_tokens": 2000, "requests_per_hour": 100})
    assert updated.status_code == 200, updated.text
    assert updated.json()["included_tokens"] == 2000 and updated.json()["requests_per_hour"] == 100
    assert updated.json()["requests_per_minute"] == 10 and updated.json()["version"] == plan["version"] + 1
    same = admin.patch(f"/admin/plans/{plan['id']}", json={"included_tokens": 2000})
    assert same.json()["version"] == updated.json()["version"]      # nothing changed, nothing recorded
    cleared = admin.patch(f"/admin/plans/{name}", json={"requests_per_hour": None}).json()
    assert cleared["requests_per_hour"] is None

    off = admin.post(f"/admin/plans/{name}/deactivate")
    assert off.status_code == 200 and off.json()["active"] is False
    inactive = [p["slug"] for p in walk(admin, "/admin/plans", 500, active="false")]
    assert name in inactive and name not in [p["slug"] for p in walk(admin, "/admin/plans", 500, active="true")]
    on = admin.post(f"/admin/plans/{plan['id']}/activate")
    assert on.status_code == 200 and on.json()["active"] is True

    gone = admin.delete(f"/admin/plans/{name}")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    refused(admin.get(f"/admin/plans/{name}"), 404, "plan", "plan_not_found")
    refused(admin.patch(f"/admin/plans/{plan['id']}", json={"included_tokens": 1}), 404, "plan")
    assert name not in [p["slug"] for p in walk(admin, "/admin/plans", 500)]
    refused(admin.post("/admin/plans", json={"slug": name, "name": "Again"}), 409, "slug", "duplicate_slug")


DROP = object()   # a field left out of the body


@pytest.mark.parametrize(("body", "field"), [
    ({"slug": DROP}, "slug"),
    ({"slug": None}, "slug"),
    ({"slug": "Not A Slug"}, "slug"),
    ({"slug": "SEED"}, "slug"),
    ({"slug": "@"}, "slug"),
    ({"name": DROP}, "name"),
    ({"name": "   "}, "name"),
    ({"monthly_price_minor": -1}, "monthly_price_minor"),
    ({"monthly_price_minor": 19.5}, "monthly_price_minor"),
    ({"monthly_price_minor": 1900.0}, "monthly_price_minor"),
    ({"input_price_per_million": 0.1}, "input_price_per_million"),
    ({"output_price_per_million": "-0.10"}, "output_price_per_million"),
    ({"output_price_per_million": "a lot"}, "output_price_per_million"),
    ({"included_tokens": -1}, "included_tokens"),
    ({"requests_per_minute": -5}, "requests_per_minute"),
    ({"requests_per_minute": 0}, "requests_per_minute"),
    ({"requests_per_hour": 0}, "requests_per_hour"),
    ({"requests_per_day": -1}, "requests_per_day"),
    ({"tokens_per_minute": "10"}, "tokens_per_minute"),
    ({"currency": "usd"}, "currency"),
    ({"cache_hit_billing": "sometimes"}, "cache_hit_billing"),
    ({"cache_hit_fraction": "1.5"}, "cache_hit_fraction"),
    ({"hard_cap": "yes"}, "hard_cap"),
    ({"colour": "blue"}, "colour"),
])
def test_create_plan_refuses_bad_terms_naming_the_field(admin: httpx.Client, body: dict, field: str) -> None:
    full = {k: v for k, v in {"slug": slug(), "name": "x", **body}.items() if v is not DROP}
    refused(admin.post("/admin/plans", json=full), 400, field)
    assert admin.get("/admin/plans/" + str(full.get("slug"))).status_code == 404      # nothing was created


def test_plan_update_and_body_errors(admin: httpx.Client) -> None:
    plan = new_plan(admin)
    ref = plan["slug"]
    refused(admin.patch(f"/admin/plans/{ref}", json={"monthly_price_minor": -100}), 400, "monthly_price_minor")
    refused(admin.patch(f"/admin/plans/{ref}", json={"requests_per_day": 0}), 400, "requests_per_day")
    refused(admin.patch(f"/admin/plans/{ref}", json={"slug": "renamed"}), 400, "slug")
    refused(admin.patch(f"/admin/plans/{ref}", json={"wings": 2}), 400, "wings")
    refused(admin.patch(f"/admin/plans/{ref}", json={}), 400, None, "empty_update")
    refused(admin.patch(f"/admin/plans/{ref}", content=b"[1, 2]"), 400, None)
    refused(admin.patch(f"/admin/plans/{ref}", content=b"{nope"), 400, None, "invalid_json")
    refused(admin.patch("/admin/plans/no-such-plan", json={"included_tokens": 1}), 404, "plan")
    refused(admin.post("/admin/plans/no-such-plan/activate"), 404, "plan")
    refused(admin.get("/admin/plans/no-such-plan/stats"), 404, "plan")
    assert admin.get(f"/admin/plans/{ref}").json() == plan            # nothing was changed
    assert httpx.get(f"{admin.base_url}/admin/plans").status_code == 401
    assert httpx.get(f"{admin.base_url}/admin/plans",
                     headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_an_assigned_plan_cannot_be_deleted_only_deactivated(admin: httpx.Client) -> None:
    plan = new_plan(admin)
    key = new_key(admin, plan["slug"])
    error = refused(admin.delete(f"/admin/plans/{plan['id']}"), 409, None, "plan_in_use")
    assert "deactivate" in error["message"]
    assert admin.post(f"/admin/plans/{plan['slug']}/deactivate").json()["active"] is False
    assert admin.get(f"/admin/plans/{plan['slug']}").status_code == 200     # still there
    # a deactivated plan takes no new assignments; the existing one keeps it
    other = new_key(admin, new_plan(admin)["slug"])
    admin.post(f"/admin/assignments/{assignment_of(admin, other['id'])['id']}/cancel")
    refused(admin.post("/admin/assignments", json={"api_key_id": other["id"], "plan": plan["slug"]}),
            409, "plan", "plan_inactive")
    assert assignment_of(admin, key["id"])["status"] == "active"


def test_new_key_on_an_unknown_plan_is_404_naming_plan(admin: httpx.Client) -> None:
    before = len(admin.get("/admin/api-keys").json()["items"])
    refused(admin.post("/admin/api-keys", json={"name": "k", "plan": "no-such-plan"}), 404, "plan")
    assert len(admin.get("/admin/api-keys").json()["items"]) == before      # no key was issued
    key = new_key(admin, "free")
    assert assignment_of(admin, key["id"])["plan"] == "free"


def test_pagination_walks_every_plan_once_in_creation_order(admin: httpx.Client) -> None:
    mine = [new_plan(admin)["id"] for _ in range(23)]
    everything = admin.get("/admin/plans", params={"limit": "500"}).json()
    assert everything["next"] is None
    walked = walk(admin, "/admin/plans", 5)
    ids = [p["id"] for p in walked]
    assert len(ids) == len(set(ids)) == len(everything["items"])            # no duplicates, no gaps
    assert ids == [p["id"] for p in everything["items"]]
    assert [i for i in ids if i in mine] == mine                            # stable: created_at, then id
    first = admin.get("/admin/plans").json()
    assert len(first["items"]) == min(100, len(ids))
    refused(admin.get("/admin/plans", params={"limit": "0"}), 400, "limit")
    refused(admin.get("/admin/plans", params={"limit": "501"}), 400, "limit")
    refused(admin.get("/admin/plans", params={"limit": "ten"}), 400, "limit")
    refused(admin.get("/admin/plans", params={"cursor": "not-a-cursor"}), 400, "cursor", "invalid_cursor")
    refused(admin.get("/admin/plans", params={"active": "maybe"}), 400, "active")


# -- assignments -------------------------------------------------------------------------------------


def test_assignment_lifecycle(admin: httpx.Client) -> None:
    basic, pro = new_plan(admin), new_plan(admin)
    key = new_key(admin, basic["slug"])
    listed = admin.get(f"/admin/api-keys/{key['id']}/assignments").json()
    assert listed["next"] is None and len(listed["items"]) == 1
    assignment = listed["items"][0]
    assert assignment["api_key_id"] == key["id"] and assignment["plan"] == basic["slug"]
    assert assignment["status"] == "active" and assignment["ends_at"] is None and assignment["starts_at"]
    assert assignment["plan_history"] == [{"plan": basic["slug"], "plan_id": basic["id"],
                                           "effective_at": assignment["starts_at"]}]
    url = f"/admin/assignments/{assignment['id']}"
    assert admin.get(url).json() == assignment

    refused(admin.post("/admin/assignments", json={"api_key_id": key["id"], "plan": pro["slug"]}),
            409, "api_key_id", "assignment_exists")
    refused(admin.post(f"{url}/suspend", json={}), 400, "reason")
    refused(admin.post(f"{url}/suspend", json={"reason": ""}), 400, "reason")
    refused(admin.post(f"{url}/suspend", json={"reason": "x", "why": "y"}), 400, "why")
    suspended = admin.post(f"{url}/suspend", json={"reason": "unpaid invoice"}).json()
    assert suspended["status"] == "suspended" and suspended["reason"] == "unpaid invoice"
    refused(admin.post(f"{url}/suspend", json={"reason": "again"}), 409, "status", "invalid_transition")
    refused(admin.post("/admin/assignments", json={"api_key_id": key["id"], "plan": pro["slug"]}),
            409, "api_key_id")                                            # a suspended one still counts
    reactivated = admin.post(f"{url}/reactivate")
    assert reactivated.status_code == 200 and reactivated.json()["status"] == "active"
    assert reactivated.json()["reason"] is None
    refused(admin.post(f"{url}/reactivate"), 409, "status")

    refused(admin.post(f"{url}/change-plan", json={"plan": basic["slug"]}), 409, "plan", "same_plan")
    refused(admin.post(f"{url}/change-plan", json={"plan": "no-such-plan"}), 404, "plan")
    refused(admin.post(f"{url}/change-plan", json={"plan": pro["id"], "effective_at": "2001-01-01T00:00:00Z"}),
            400, "effective_at")
    refused(admin.post(f"{url}/change-plan", json={"plan": pro["id"], "effective_at": "soon"}), 400, "effective_at")
    changed = admin.post(f"{url}/change-plan", json={"plan": pro["id"]}).json()
    assert changed["plan"] == pro["slug"] and changed["plan_id"] == pro["id"]
    assert [h["plan"] for h in changed["plan_history"]] == [basic["slug"], pro["slug"]]

    refused(admin.patch(url, json={"ends_at": "2001-01-01T00:00:00+00:00"}), 400, "ends_at")
    refused(admin.patch(url, json={}), 400, "ends_at")
    refused(admin.patch(url, json={"ends_at": "2999-01-01T00:00:00"}), 400, "ends_at")   # no timezone
    ends = admin.patch(url, json={"ends_at": "2999-01-01T00:00:00Z"}).json()
    assert ends["ends_at"].startswith("2999-01-01T00:00:00")
    assert admin.patch(url, json={"ends_at": None}).json()["ends_at"] is None

    cancelled = admin.post(f"{url}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    refused(admin.post(f"{url}/reactivate"), 409, "status", "invalid_transition")
    refused(admin.post(f"{url}/cancel", json={"reason": "twice"}), 409, "status")
    refused(admin.post(f"{url}/change-plan", json={"plan": basic["slug"]}), 409, "status")

    again = admin.post("/admin/assignments", json={"api_key_id": key["id"], "plan": basic["slug"],
                                                   "starts_at": "2030-01-01T00:00:00Z",
                                                   "ends_at": "2031-01-01T00:00:00Z"})
    assert again.status_code == 201, again.text
    assert again.json()["starts_at"].startswith("2030-01-01") and again.json()["id"] != assignment["id"]
    history = admin.get(f"/admin/api-keys/{key['id']}/assignments").json()["items"]
    assert [a["id"] for a in history] == [assignment["id"], again.json()["id"]]


def test_assignment_create_and_lookup_errors(admin: httpx.Client) -> None:
    plan = new_plan(admin)
    key = new_key(admin, plan["slug"])
    admin.post(f"/admin/assignments/{assignment_of(admin, key['id'])['id']}/cancel", json={"reason": "test"})
    base = {"api_key_id": key["id"], "plan": plan["slug"]}
    refused(admin.post("/admin/assignments", json={**base, "api_key_id": str(uuid.uuid4())}), 404, "api_key_id")
    refused(admin.post("/admin/assignments", json={**base, "plan": "no-such-plan"}), 404, "plan")
    refused(admin.post("/admin/assignments", json={**base, "starts_at": "2030-02-01T00:00:00Z",
                                                   "ends_at": "2030-01-01T00:00:00Z"}), 400, "ends_at")
    refused(admin.post("/admin/assignments", json={**base, "starts_at": "tomorrow"}), 400, "starts_at")
    refused(admin.post("/admin/assignments", json={**base, "starts_at": "2030-02-01T00:00:00"}), 400, "starts_at")
    refused(admin.post("/admin/assignments", json={**base, "priority": 1}), 400, "priority")
    refused(admin.post("/admin/assignments", json={"api_key_id": key["id"]}), 400, "plan")
    refused(admin.post("/admin/assignments", json={**base, "plan": 7}), 400, "plan")
    missing = f"/admin/assignments/{uuid.uuid4()}"
    refused(admin.get(missing), 404, "id", "assignment_not_found")
    refused(admin.post(f"{missing}/suspend", json={"reason": "x"}), 404, "id")
    refused(admin.post(f"{missing}/reactivate"), 404, "id")
    refused(admin.post(f"{missing}/cancel"), 404, "id")
    refused(admin.post(f"{missing}/change-plan", json={"plan": plan["slug"]}), 404, "id")
    refused(admin.patch(missing, json={"ends_at": None}), 404, "id")
    refused(admin.get(f"/admin/api-keys/{uuid.uuid4()}/assignments"), 404, "id")
    assert admin.post("/admin/assignments", json=base).status_code == 201


def test_assignment_filters_and_pagination(admin: httpx.Client) -> None:
    p, q = new_plan(admin), new_plan(admin)
    on_p = [assignment_of(admin, new_key(admin, p["slug"])["id"]) for _ in range(7)]
    on_q = [assignment_of(admin, new_key(admin, q["id"])["id"]) for _ in range(3)]
    for a in on_p[:2]:
        admin.post(f"/admin/assignments/{a['id']}/suspend", json={"reason": "test"})
    admin.post(f"/admin/assignments/{on_q[0]['id']}/cancel")

    def ids(**params: str) -> list[str]:
        return [a["id"] for a in walk(admin, "/admin/assignments", 3, **params)]

    assert ids(plan=p["slug"]) == [a["id"] for a in on_p]
    assert ids(plan=q["id"]) == [a["id"] for a in on_q]
    assert ids(plan=p["id"], status="suspended") == [a["id"] for a in on_p[:2]]
    assert ids(plan=p["slug"], status="active") == [a["id"] for a in on_p[2:]]
    assert ids(plan=q["slug"], status="cancelled") == [on_q[0]["id"]]
    assert ids(api_key_id=on_p[3]["api_key_id"]) == [on_p[3]["id"]]
    assert ids(api_key_id=on_q[0]["api_key_id"], status="active") == []
    everything = ids()
    assert len(everything) == len(set(everything)) and set(a["id"] for a in on_p + on_q) <= set(everything)
    refused(admin.get("/admin/assignments", params={"status": "paused"}), 400, "status")
    refused(admin.get("/admin/assignments", params={"plan": "no-such-plan"}), 404, "plan")
    refused(admin.get("/admin/assignments", params={"api_key_id": str(uuid.uuid4())}), 404, "api_key_id")
    refused(admin.get("/admin/assignments", params={"limit": "1000"}), 400, "limit")


# -- stats -----------------------------------------------------------------------------------------------


def chat(server: Any, secret: str, text: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}, timeout=10)


def test_stats_follow_real_completions(admin: httpx.Client, server: Any) -> None:
    # 1 cent per input token and 2 per output token beyond the allowance (none): the bill is exact
    plan = new_plan(admin, monthly_price_minor=1900, included_tokens=0, input_price_per_million="10000",
                    output_price_per_million="20000", requests_per_day=3)
    free_ride = new_plan(admin, monthly_price_minor=700, included_tokens=1_000_000)
    overall_before = admin.get("/admin/assignments/stats").json()
    key = new_key(admin, plan["slug"])
    idle = new_key(admin, plan["id"])
    admin.post(f"/admin/assignments/{assignment_of(admin, idle['id'])['id']}/suspend", json={"reason": "idle"})
    other = new_key(admin, free_ride["slug"])

    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for text in ("Hello there", "Tell me something longer about the sea and the sky", "Bye"):
        reply = chat(server, key["key"], text)
        assert reply.status_code == 200, reply.text
        for name in usage:
            usage[name] += reply.json()["usage"][name]
    assert chat(server, key["key"], "one too many").status_code == 429      # refusals are not usage
    assert chat(server, idle["key"], "suspended").status_code == 403
    assert chat(server, other["key"], "on the other plan").status_code == 200

    stats = admin.get(f"/admin/plans/{plan['slug']}/stats")
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["plan_id"] == plan["id"] and body["slug"] == plan["slug"]
    assert body["assignments"] == {"active": 1, "suspended": 1, "cancelled": 0, "total": 2}
    assert body["this_cycle"] == dict(usage, requests=3, cache_hits=0)
    expected = 1900 + usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2   # base + overage, in cents
    assert body["revenue_so_far"] == {"amount_minor": expected, "currency": "USD",
                                      "amount": f"{expected // 100}.{expected % 100:02d}"}
    assert admin.get(f"/admin/plans/{plan['id']}/stats").json()["this_cycle"] == body["this_cycle"]

    other_stats = admin.get(f"/admin/plans/{free_ride['id']}/stats").json()
    assert other_stats["this_cycle"]["requests"] == 1
    assert other_stats["revenue_so_far"]["amount_minor"] == 700           # inside the allowance: base only

    overall = admin.get("/admin/assignments/stats").json()
    assert overall["by_plan"][plan["slug"]] == body["assignments"]
    assert overall["assignments"]["total"] == overall_before["assignments"]["total"] + 3
    assert overall["assignments"]["suspended"] == overall_before["assignments"]["suspended"] + 1
    delta = {k: overall["this_cycle"][k] - overall_before["this_cycle"][k] for k in overall["this_cycle"]}
    assert delta["requests"] == 4 and delta["total_tokens"] == usage["total_tokens"] + \
        other_stats["this_cycle"]["total_tokens"]

    def usd(stats: dict) -> int:
        return sum(m["amount_minor"] for m in stats["revenue_so_far"] if m["currency"] == "USD")
    assert usd(overall) - usd(overall_before) == expected + 700

    # suspending the last active assignment takes its cycle out of the revenue; usage stays
    admin.post(f"/admin/assignments/{assignment_of(admin, key['id'])['id']}/suspend", json={"reason": "x"})
    after = admin.get(f"/admin/plans/{plan['slug']}/stats").json()
    assert after["revenue_so_far"]["amount_minor"] == 0 and after["this_cycle"] == body["this_cycle"]


def test_an_unknown_field_in_a_key_body_is_a_400_naming_it(admin: httpx.Client) -> None:
    refused(admin.post("/admin/api-keys", json={"name": "k", "plann": "free"}), 400, "plann")


@pytest.mark.parametrize("body, field", [
    ({"name": "a\x00b"}, "name"), ({"name": "line\nbreak"}, "name"), ({"name": "n" * 201}, "name"),
    ({"name": "   "}, "name"), ({"name": "ok", "owner": "o\x07"}, "owner"), ({"name": "ok", "owner": "o" * 201}, "owner"),
])
def test_a_key_name_or_owner_must_be_printable_and_at_most_200_characters(admin: httpx.Client, body: dict,
                                                                          field: str) -> None:
    refused(admin.post("/admin/api-keys", json=body), 400, field)


def test_a_key_owner_left_blank_is_its_name(admin: httpx.Client) -> None:
    created = admin.post("/admin/api-keys", json={"name": "  billing-service ", "owner": "  "})
    assert created.status_code == 201, created.text
    assert (created.json()["name"], created.json()["owner"]) == ("billing-service", "billing-service")


def test_json_nested_too_deeply_is_a_400_on_every_admin_body(admin: httpx.Client) -> None:
    """A plan's terms take any JSON; one nested past the decoder's depth was a 500."""
    plan = new_plan(admin)
    for deep in (b'{"slug": "deep", "name": "x", "terms": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
                 b'{"a":' * 5000 + b"1" + b"}" * 5000):
        for method, path in (("POST", "/admin/plans"), ("PATCH", f"/admin/plans/{plan['slug']}"),
                             ("POST", "/admin/api-keys"), ("POST", "/admin/assignments")):
            response = admin.request(method, path, content=deep, headers={"content-type": "application/json"})
            assert response.status_code == 400, (method, path, response.text)
            assert response.json()["error"]["code"] in ("invalid_json", "invalid_field"), response.text
