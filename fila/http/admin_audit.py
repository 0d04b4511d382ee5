"""/admin/audit: replay a billing cycle from the raw events, verify the hash chain (admin token).

``GET /admin/audit/cycles/{cycle_id}[?as_of=ISO]`` answers the replay report (``agrees`` false
when the billing view differs; the differences name the events responsible); an unknown cycle
is a 404. ``GET /admin/audit/verify`` answers the chain report (``ok`` false on any altered or
deleted event). Both are 200 whatever they find: the finding is the answer.
"""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.params import FromPath

from fila.domain.errors import InvalidRequest
from fila.domain.time import parse_iso
from fila.http.admin_keys import _admin, json
from fila.services.keys import parse_id


def _as_of(request: Request) -> str | None:
    raw = request.query_params.get("as_of")
    if raw is None:
        return None
    try:
        return parse_iso(raw.replace("Z", "+00:00")).isoformat()
    except ValueError:
        raise InvalidRequest("'as_of' must be an ISO-8601 datetime with a timezone, e.g. 2026-01-31T00:00:00Z",
                             param="as_of") from None


@get("/admin/audit/cycles/{cycle_id:str}", summary="Replay a billing cycle from the raw events; compare with the bill")
async def replay_cycle(request: Request, cycle_id: FromPath[str]) -> Response:
    container = _admin(request)
    cycle = str(parse_id(cycle_id, "cycle_id"))   # a cycle id is a UUID: anything else is a 400
    return json(await container.audit.replay(cycle, _as_of(request)))


@get("/admin/audit/verify", summary="Check every stored event against the audit hash chain")
async def verify_chain(request: Request) -> Response:
    container = _admin(request)
    return json(await container.audit.verify())


ROUTES = [replay_cycle, verify_chain]
