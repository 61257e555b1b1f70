"""The REST admin API: handlers, the JSON error contract, and who may call what.

Every route declares its ``Access``; ``guard`` authenticates the caller (``access.Tokens``) and
refuses what its token may not do before any handler runs. Every refusal is JSON
``{"error": ..., "field": ...}`` with a 4xx; a store failure is a 503. A 500 only ever means a
bug, and is logged with its traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_plane import locks, metrics, ownership, schema, table
from control_plane.access import Access, Principal, Tokens
from control_plane.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    StoreError,
    Unauthorized,
    UnsupportedMediaType,
)
from control_plane.locks import Locks
from control_plane.model import InstanceRecord, InstanceView, ServiceSummary, TokenRecord
from control_plane.ownership import Claimant
from control_plane.publisher import Publisher
from control_plane.registry import Registry
from control_plane.trust import Root, Trust, not_after
from control_plane.wire import HASH_POLICIES, STREAM_PATH, Policy, to_json

log = logging.getLogger("meshlet.api")

REGISTRY = web.AppKey("registry", Registry)
PUBLISHER = web.AppKey("publisher", Publisher)
METRICS = web.AppKey("metrics", metrics.Metrics)
TOKENS = web.AppKey("tokens", Tokens)
LOCKS = web.AppKey("locks", Locks)
TRUST = web.AppKey("trust", Trust)
PRINCIPAL = web.RequestKey("principal", Principal)


@dataclass(slots=True)
class Readiness:
    """Set by the lifecycle: ready once the store is loaded, not ready from shutdown on; and
    not ready while the store refuses writes (a full disk), as the last write or probe said."""

    ready: bool = False
    store_error: str = ""

    def store_failed(self, error: StoreError) -> None:
        if not self.store_error:
            log.warning("store refuses writes, not ready: %s", error)
        self.store_error = str(error) or type(error).__name__

    def store_works(self) -> None:
        if self.store_error:
            log.info("store takes writes again: ready")
        self.store_error = ""


READY = web.AppKey("ready", Readiness)
OPENAPI = web.AppKey("openapi", bytes)

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


def authorize(principal: Principal, access: Access, request: web.Request) -> None:
    """Forbidden unless ``principal`` may make this call."""
    if access is Access.ADMIN and not principal.admin:
        raise Forbidden(
            f"{principal} may not {request.method} {request.path}: only the admin token may "
            "(a service or join token registers, heartbeats and deregisters instances, takes "
            "its service's locks, and opens the stream)"
        )
    service = request.match_info.get("service", "")
    if access is Access.INSTANCE and not principal.acts_for(service):
        raise Forbidden(f"{principal} acts only for {principal.service}, not {service[:80]}")


def _access(request: web.Request) -> Access:
    route = request.match_info.route
    known = _ACCESS.get(route.handler) if route is not None else None
    if known is not None:
        return known
    # no route (404, 405): /v1 answers only callers with a token, so nobody maps it unasked
    return Access.TOKEN if request.path.startswith("/v1/") else Access.OPEN


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate and authorize the caller, then the error contract around every handler."""
    access = _access(request)
    try:
        if access is not Access.OPEN:
            principal = request.app[TOKENS].authenticate(request.headers.get("Authorization"))
            if principal is None:
                raise Unauthorized(
                    "token missing, unknown or revoked: send Authorization: Bearer <token>"
                )
            authorize(principal, access, request)
            request[PRINCIPAL] = principal
    except (Unauthorized, Forbidden) as e:
        request.app[TOKENS].refusals[e.status] += 1
        headers = {"WWW-Authenticate": 'Bearer realm="meshlet"'} if e.status == 401 else None
        return error_response(e, headers)
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except StoreError as e:
        request.app[READY].store_failed(e)
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
        "namespace": r.namespace,
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


_SVC = "/v1/services/{service}"
_INST = _SVC + "/instances/{id}"


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


def _service(request: web.Request) -> str:
    return schema.service_name(request.match_info["service"])


def _instance_id(request: web.Request) -> str:
    return schema.instance_id(request.match_info["id"])


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READY]
    if readiness.ready and not readiness.store_error:
        return json_response({"status": "ready"})
    if readiness.ready:
        reason = f"store refuses writes: {readiness.store_error}"
        return json_response({"status": "not ready", "reason": reason}, 503)
    return json_response({"status": "not ready"}, 503)


async def prometheus(request: web.Request) -> web.Response:
    # no token ever: read-only, like /healthz, for Prometheus to scrape
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
    """Replicas list the sidecars of them all (each with its ``replica``); a replica that
    cannot read the others' lists from the store answers 503 rather than a partial list."""
    return json_response({"sidecars": await request.app[PUBLISHER].all_sidecars()})


async def stream(request: web.Request) -> web.StreamResponse:
    return await request.app[PUBLISHER].handle(request, request[PRINCIPAL])


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


def _may_change(request: web.Request, record: InstanceRecord | None, changes: bool = True) -> None:
    """Conflict unless the caller may register again, change or remove ``record``."""
    if record is None:
        return
    owner = request.app[PUBLISHER].owner(record.service, record.id)
    live = owner.claimant if owner is not None else None
    refused = ownership.refusal(record, live, Claimant(request[PRINCIPAL]), changes=changes)
    if refused is not None:
        raise Conflict(f"{refused.message}: only the admin token may change or remove it", "id")


async def register(request: web.Request) -> web.Response:
    name = _service(request)
    registration = schema.document(schema.Registration, await read_json(request))
    record = _registry(request).find(name, registration.instance_id())
    changes = ownership.changes(record, registration)
    _may_change(request, record, changes)
    # registering again without a change is a sign of life, not a claim
    origin = record.origin if record and not changes else Claimant(request[PRINCIPAL]).origin
    view, created = await _registry(request).register(name, registration, origin)
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
    name, instance_id = _service(request), _instance_id(request)
    _may_change(request, _registry(request).find(name, instance_id))
    await _registry(request).deregister(name, instance_id)
    return web.Response(status=204)


def token_json(record: TokenRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "service": record.service,
        "description": record.description,
        "created": _iso(record.created),
        "last_used": _iso(record.last_used),
    }


async def create_token(request: web.Request) -> web.Response:
    body = schema.document(schema.TokenRequest, await read_json(request))
    record, secret = await request.app[TOKENS].mint(body.service, body.description)
    log.info("token %s minted for service %s (%s)", record.id, record.service, record.description)
    location = {"Location": f"/v1/tokens/{record.id}"}
    return json_response({**token_json(record), "secret": secret}, 201, location)


async def list_tokens(request: web.Request) -> web.Response:
    return json_response({"tokens": [token_json(r) for r in request.app[TOKENS].records()]})


async def revoke_token(request: web.Request) -> web.Response:
    """Revoke, and close the token's streams at once (their sidecars keep serving from the
    table they have, and cannot reconnect with it)."""
    record = await request.app[TOKENS].revoke(request.match_info["id"])
    closed = await request.app[PUBLISHER].close_streams_of(record.id)
    log.info(
        "token %s of service %s revoked (%d streams closed)", record.id, record.service, closed
    )
    return web.Response(status=204)


# -- locks ------------------------------------------------------------------------------------


_LOCK = _SVC + "/locks/{name}"


def _lock_name(request: web.Request) -> str:
    return locks.check_name(request.match_info["name"])


async def acquire_lock(request: web.Request) -> web.Response:
    """Take the lock (waiting up to ``wait_ms``): its fencing token; 409 while held."""
    service, name = _service(request), _lock_name(request)
    body = schema.document(schema.LockRequest, await read_json(request))

    def gone() -> bool:  # the caller hung up: stop waiting for it
        return request.transport is None or request.transport.is_closing()

    held = await request.app[LOCKS].acquire(service, name, body.ttl_ms, body.wait_ms, gone)
    return json_response(
        {
            "name": held.name,
            "token": held.token,
            "expires_in_ms": held.expires_in_ms,
            "shared": held.shared,
        }
    )


async def renew_lock(request: web.Request) -> web.Response:
    service, name = _service(request), _lock_name(request)
    body = schema.document(schema.LockRenewal, await read_json(request))
    grant = await request.app[LOCKS].renew(service, name, body.token, body.ttl_ms)
    return json_response({"token": grant.token, "expires_in_ms": grant.expires_in_ms})


async def release_lock(request: web.Request) -> web.Response:
    service, name = _service(request), _lock_name(request)
    body = schema.document(schema.LockRelease, await read_json(request))
    await request.app[LOCKS].release(service, name, body.token)
    return web.Response(status=204)


def _grant_json(name: str, services: frozenset[str]) -> dict[str, Any]:
    return {"name": name, "services": sorted(services)}


async def list_lock_grants(request: web.Request) -> web.Response:
    grants = request.app[LOCKS].grants
    return json_response({"grants": [_grant_json(n, grants[n]) for n in sorted(grants)]})


async def put_lock_grant(request: web.Request) -> web.Response:
    name = _lock_name(request)
    body = schema.document(schema.LockGrantRequest, await read_json(request))
    services = await request.app[LOCKS].grant(name, body.services)
    log.info("lock name %s shared by %s", name, ", ".join(sorted(services)))
    return json_response(_grant_json(name, services))


async def delete_lock_grant(request: web.Request) -> web.Response:
    name = _lock_name(request)
    await request.app[LOCKS].revoke(name)
    log.info("lock name %s no longer shared", name)
    return web.Response(status=204)


# -- trust ----------------------------------------------------------------------------------


def _root_json(root: Root, signing: bool) -> dict[str, Any]:
    return {
        "sha256": root.fingerprint,
        "subject": root.certificate.subject.rfc4514_string(),
        "not_after": not_after(root),
        "pem": root.pem,
        "signing": signing,
    }


async def get_trust_bundle(request: web.Request) -> web.Response:
    roots = request.app[TRUST].roots()
    return json_response({"roots": [_root_json(root, signing) for root, signing in roots]})


async def add_root(request: web.Request) -> web.Response:
    """Add a root sidecars trust (a bring-your-own CA's, or the next one of a rotation)."""
    body = schema.document(schema.RootRequest, await read_json(request))
    root = await request.app[TRUST].add_root(body.pem)
    location = {"Location": f"/v1/trust-bundle/{root.fingerprint}"}
    return json_response(_root_json(root, False), 201, location)


async def delete_root(request: web.Request) -> web.Response:
    await request.app[TRUST].delete_root(request.match_info["sha256"])
    return web.Response(status=204)


async def get_ca(request: web.Request) -> web.Response:
    """The signing CA's certificate (never its key), PEM."""
    cert, _ = request.app[TRUST].authority.pem()
    return web.Response(body=cert, content_type="application/x-pem-file")


_ROUTES: list[tuple[str, str, Handler, Access]] = [
    ("GET", "/healthz", healthz, Access.OPEN),
    ("GET", "/readyz", readyz, Access.OPEN),
    ("GET", "/metrics", prometheus, Access.OPEN),
    ("GET", "/openapi.json", openapi, Access.OPEN),
    ("GET", "/v1/services", list_services, Access.ADMIN),
    ("GET", "/v1/table", get_table, Access.ADMIN),
    ("GET", "/v1/sidecars", list_sidecars, Access.ADMIN),
    ("GET", STREAM_PATH, stream, Access.TOKEN),
    ("GET", "/v1/tokens", list_tokens, Access.ADMIN),
    ("POST", "/v1/tokens", create_token, Access.ADMIN),
    ("DELETE", "/v1/tokens/{id}", revoke_token, Access.ADMIN),
    ("GET", _SVC, get_service, Access.ADMIN),
    ("GET", _SVC + "/policy", get_policy, Access.ADMIN),
    ("PUT", _SVC + "/policy", put_policy, Access.ADMIN),
    ("DELETE", _SVC + "/policy", delete_policy, Access.ADMIN),
    ("GET", _SVC + "/ring", ring_owner, Access.ADMIN),
    ("POST", _SVC + "/instances", register, Access.INSTANCE),
    ("GET", _SVC + "/instances", list_instances, Access.ADMIN),
    ("GET", _INST, get_instance, Access.ADMIN),
    ("PUT", _INST + "/heartbeat", heartbeat, Access.INSTANCE),
    ("PATCH", _INST, patch_instance, Access.ADMIN),
    ("DELETE", _INST, delete_instance, Access.INSTANCE),
    ("POST", _LOCK, acquire_lock, Access.INSTANCE),
    ("PUT", _LOCK + "/renew", renew_lock, Access.INSTANCE),
    ("DELETE", _LOCK, release_lock, Access.INSTANCE),
    ("GET", "/v1/lock-grants", list_lock_grants, Access.ADMIN),
    ("PUT", "/v1/lock-grants/{name}", put_lock_grant, Access.ADMIN),
    ("DELETE", "/v1/lock-grants/{name}", delete_lock_grant, Access.ADMIN),
    ("GET", "/v1/trust-bundle", get_trust_bundle, Access.ADMIN),
    ("POST", "/v1/trust-bundle", add_root, Access.ADMIN),
    ("DELETE", "/v1/trust-bundle/{sha256}", delete_root, Access.ADMIN),
    ("GET", "/v1/ca", get_ca, Access.ADMIN),
]
_ACCESS: dict[Handler, Access] = {handler: access for _, _, handler, access in _ROUTES}


def add_routes(app: web.Application) -> None:
    app.router.add_routes(
        [web.route(method, path, handler) for method, path, handler, _ in _ROUTES]
    )
