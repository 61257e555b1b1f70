"""The REST admin API: handlers, the JSON error contract and admin-token checks.

Every refusal is JSON ``{"error": ..., "field": ...}`` with a 4xx; a store failure is a 503.
A 500 only ever means a bug, and is logged with its traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_plane import metrics, schema, table
from control_plane.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    StoreError,
    Unauthorized,
    UnsupportedMediaType,
)
from control_plane.model import InstanceView, ServiceSummary
from control_plane.publisher import Publisher
from control_plane.registry import Registry
from control_plane.wire import HASH_POLICIES, STREAM_PATH, Policy, to_json

log = logging.getLogger("meshlet.api")

REGISTRY = web.AppKey("registry", Registry)
PUBLISHER = web.AppKey("publisher", Publisher)
METRICS = web.AppKey("metrics", metrics.Metrics)
ADMIN_TOKEN = web.AppKey("admin_token", str)  # "" when no token is required


@dataclass(slots=True)
class Readiness:
    """Set by the lifecycle: ready once the store is loaded, not ready from shutdown on."""

    ready: bool = False


READY = web.AppKey("ready", Readiness)
OPENAPI = web.AppKey("openapi", bytes)

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON_TYPES = ("application/json",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error.to_json(), error.status, headers)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin token on mutating calls, then the error contract around every handler."""
    token = request.app[ADMIN_TOKEN]
    if token and request.method in _MUTATING:
        given = request.headers.get("Authorization", "")
        # surrogateescape: a header that is not UTF-8 is just a wrong token, not a crash
        if not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()
        ):
            why = "missing" if not given else "wrong"
            return error_response(
                Unauthorized(f"{why} admin token: send Authorization: Bearer <token>"),
                {"WWW-Authenticate": 'Bearer realm="meshlet"'},
            )
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except StoreError as e:
        log.warning("store failed during %s %s: %s", request.method, request.path, e)
        return json_response({"error": f"store unavailable: {e}", "field": None}, 503)
    except web.HTTPException as e:
        # aiohttp's own refusals (unknown route, wrong method, body too large) as JSON too
        if e.status == 413:
            return error_response(
                PayloadTooLarge(f"body larger than {schema.MAX_BODY_BYTES} bytes")
            )
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        message = f"{e.reason}: {request.method} {request.path}"
        return json_response({"error": message, "field": None}, e.status, headers)
    except Exception:
        log.exception("bug: unhandled error in %s %s", request.method, request.path)
        return json_response(
            {"error": "internal error (a bug; see the control plane log)", "field": None}, 500
        )


async def read_json(request: web.Request) -> Any:
    """The request body as strict JSON; 400, 413 (from ``client_max_size``) or 415."""
    body = await request.read()
    if not body:
        raise BadRequest("request body required: a JSON object", "(body)")
    if request.content_type not in _JSON_TYPES:
        raise UnsupportedMediaType(
            f"content type {request.content_type!r} not supported; send application/json"
        )
    return schema.decode_json(body)


# -- JSON views ---------------------------------------------------------------------------


def instance_json(view: InstanceView) -> dict[str, Any]:
    r = view.record
    return {
        "service": r.service,
        "id": r.id,
        "address": r.address,
        "port": r.port,
        "zone": r.zone,
        "weight": r.weight,
        "metadata": r.metadata,
        "status": view.status.value,
        "last_heartbeat": _iso(view.last_heartbeat),
    }


def _summary_json(s: ServiceSummary) -> dict[str, Any]:
    counts: dict[str, int] = {status.value: n for status, n in s.counts.items()}
    counts["total"] = sum(s.counts.values())
    return {"name": s.name, "lb": s.lb, "instances": counts}


def _policy_json(name: str, policy: Policy, policy_set: bool) -> dict[str, Any]:
    return {"service": name, "policy": to_json(policy), "policy_set": policy_set}


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


# -- handlers -----------------------------------------------------------------------------


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


def _service(request: web.Request) -> str:
    return schema.service_name(request.match_info["service"])


def _instance_id(request: web.Request) -> str:
    return schema.instance_id(request.match_info["id"])


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[READY].ready:
        return json_response({"status": "ready"})
    return json_response({"status": "not ready"}, 503)


async def prometheus(request: web.Request) -> web.Response:
    # no token even with --admin-token: read-only, like /healthz, for Prometheus to scrape
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": metrics.CONTENT_TYPE}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def ring_owner(request: web.Request) -> web.Response:
    """Which instance sidecars send ``key`` to, by the table pushed to them (so a change
    answers once it is pushed, with that table's version)."""
    name = _service(request)
    key = request.query.get("key")
    if key is None:
        raise BadRequest("the key to look up is required: ?key=K", "key")
    _registry(request).service(name)  # 404 for a service the registry does not know
    publisher = request.app[PUBLISHER]
    version, entry = publisher.version, publisher.services.get(name)
    if entry is None:
        raise Conflict(f"service {name} is not in the pushed table yet", "service")
    lb = entry["policy"]["lb"]
    if lb not in HASH_POLICIES:
        raise BadRequest(f"service {name} does not hash in table v{version} (lb {lb})", "service")
    instance = table.ring_owner(entry, key)
    if instance is None:
        raise Conflict(f"service {name} has no routable endpoint to own a key", "service")
    return json_response({"key": key, "instance": instance, "algorithm": lb, "version": version})


async def get_table(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[PUBLISHER].payload.encode(), content_type="application/json"
    )


async def list_sidecars(request: web.Request) -> web.Response:
    return json_response({"sidecars": request.app[PUBLISHER].sidecars()})


async def stream(request: web.Request) -> web.StreamResponse:
    return await request.app[PUBLISHER].handle(request)


async def list_services(request: web.Request) -> web.Response:
    registry = _registry(request)
    return json_response(
        {
            "services": [_summary_json(s) for s in registry.services()],
            "protection": registry.protection,
        }
    )


async def get_service(request: web.Request) -> web.Response:
    view = _registry(request).service(_service(request))
    body = _policy_json(view.name, view.policy, view.policy_set)
    body["instances"] = [instance_json(i) for i in view.instances]
    return json_response(body)


async def get_policy(request: web.Request) -> web.Response:
    view = _registry(request).service(_service(request))
    return json_response(_policy_json(view.name, view.policy, view.policy_set))


async def put_policy(request: web.Request) -> web.Response:
    name = _service(request)
    policy = schema.document(Policy, await read_json(request))
    await _registry(request).set_policy(name, policy)
    return json_response(_policy_json(name, policy, True))


async def delete_policy(request: web.Request) -> web.Response:
    await _registry(request).clear_policy(_service(request))
    return web.Response(status=204)


async def register(request: web.Request) -> web.Response:
    name = _service(request)
    registration = schema.document(schema.Registration, await read_json(request))
    view, created = await _registry(request).register(name, registration)
    location = f"/v1/services/{name}/instances/{view.record.id}"
    return json_response(instance_json(view), 201 if created else 200, {"Location": location})


async def list_instances(request: web.Request) -> web.Response:
    name = _service(request)
    views = _registry(request).instances(name)
    return json_response({"service": name, "instances": [instance_json(v) for v in views]})


async def get_instance(request: web.Request) -> web.Response:
    view = _registry(request).instance(_service(request), _instance_id(request))
    return json_response(instance_json(view))


async def heartbeat(request: web.Request) -> web.Response:
    # The hottest call: names are checked only when the lookup misses (a registered name is
    # valid), and the answer is formatted directly (names and ids hold no JSON specials).
    service, instance_id = request.match_info["service"], request.match_info["id"]
    try:
        status = _registry(request).heartbeat(service, instance_id)
    except NotFound:
        schema.service_name(service)
        schema.instance_id(instance_id)
        raise
    body = f'{{"service":"{service}","id":"{instance_id}","status":"{status.value}"}}'
    return web.Response(body=body.encode(), content_type="application/json")


async def patch_instance(request: web.Request) -> web.Response:
    name, instance_id = _service(request), _instance_id(request)
    patch = schema.document(schema.InstancePatch, await read_json(request))
    view = await _registry(request).update(name, instance_id, patch)
    return json_response(instance_json(view))


async def delete_instance(request: web.Request) -> web.Response:
    await _registry(request).deregister(_service(request), _instance_id(request))
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    svc = "/v1/services/{service}"
    inst = svc + "/instances/{id}"
    app.router.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", prometheus),
            web.get("/openapi.json", openapi),
            web.get("/v1/services", list_services),
            web.get("/v1/table", get_table),
            web.get("/v1/sidecars", list_sidecars),
            web.get(STREAM_PATH, stream),
            web.get(svc, get_service),
            web.get(svc + "/policy", get_policy),
            web.put(svc + "/policy", put_policy),
            web.delete(svc + "/policy", delete_policy),
            web.get(svc + "/ring", ring_owner),
            web.post(svc + "/instances", register),
            web.get(svc + "/instances", list_instances),
            web.get(inst, get_instance),
            web.put(inst + "/heartbeat", heartbeat),
            web.patch(inst, patch_instance),
            web.delete(inst, delete_instance),
        ]
    )
