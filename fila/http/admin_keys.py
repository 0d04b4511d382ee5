"""/admin/api-keys: issue, list, revoke, rotate (admin token)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post

from fila.domain.errors import InvalidRequest
from fila.http.auth import require_admin

_encode = msgspec.json.Encoder().encode


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    owner: str | None = None
    plan: str | None = None


class RevokeKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str = "revoked by an admin"


def decode_body(raw: bytes, kind: type, *, allow_empty: bool = False) -> Any:
    """Decode an admin body into a Struct; a bad one is a 400 naming the field."""
    if not raw.strip():
        if allow_empty:
            return kind()
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as error:
        text = str(error)
        field = text.split("`$.", 1)[1].split("`")[0] if "`$." in text else None
        if field is None and ("missing required field" in text or "unknown field" in text):
            field = text.split("`")[1] if "`" in text else None
        raise InvalidRequest(text, param=field, code="invalid_field") from None
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("the body nests JSON too deeply", code="invalid_json") from None


def json(data: Any, status: int = 200) -> Response:
    return Response(_encode(data), status_code=status, media_type="application/json")


def _admin(request: Request) -> Any:
    container = request.app.state.container
    require_admin(request, container.settings.admin_token)
    return container


@post("/admin/api-keys", status_code=201, summary="Issue an API key; its secret is shown only now")
async def create_key(request: Request) -> Response:
    container = _admin(request)
    body = decode_body(await request.body(), CreateKey)
    record, secret = await container.issue_key(body.name, body.owner, body.plan)
    return json(dict(record.to_public(), key=secret), 201)


@get("/admin/api-keys", summary="List API keys (never their secrets)")
async def list_keys(request: Request) -> Response:
    container = _admin(request)
    return json({"items": [k.to_public() for k in container.keys.list()], "next": None})


@get("/admin/api-keys/{key_id:str}", summary="Show one API key")
async def show_key(request: Request, key_id: str) -> Response:
    container = _admin(request)
    return json(container.keys.get(key_id).to_public())


@post("/admin/api-keys/{key_id:str}/revoke", status_code=200, summary="Revoke an API key")
async def revoke_key(request: Request, key_id: str) -> Response:
    container = _admin(request)
    body = decode_body(await request.body(), RevokeKey, allow_empty=True)
    return json((await container.keys.revoke(key_id, body.reason)).to_public())


@post("/admin/api-keys/{key_id:str}/rotate", status_code=200, summary="Rotate an API key's secret")
async def rotate_key(request: Request, key_id: str) -> Response:
    container = _admin(request)
    record, secret = await container.keys.rotate(key_id)
    return json(dict(record.to_public(), key=secret))


ROUTES = [create_key, list_keys, show_key, revoke_key, rotate_key]
