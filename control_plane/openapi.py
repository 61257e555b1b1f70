"""The OpenAPI 3.1 description of the REST API, served at ``/openapi.json``.

Request schemas are generated from the same documents the API parses with (``wire.Policy``,
``schema.Registration``, ``schema.InstancePatch``), so the spec cannot drift from the checks.
"""

from __future__ import annotations

from typing import Any

from control_plane import locks, schema, wire
from control_plane.access import Access
from control_plane.model import Status

_VERSION = "0.1.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_ERRORS = {
    "400": _json("Error", "invalid input; `field` names what is wrong"),
    "401": _json("Error", "token missing, unknown or revoked (when any token is configured)"),
    "403": _json("Error", "the token may not make this call (another service's, or not admin)"),
    "404": _json("Error", "no such service, instance or token"),
    "413": _json("Error", "body larger than 1 MiB"),
    "415": _json("Error", "body is not application/json"),
    "429": _json("Error", "too many lock acquisitions are waiting on this control plane"),
    "503": _json("Error", "the store is unavailable"),
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _ERRORS[code] for code in codes}


_SERVICE = {
    "name": "service",
    "in": "path",
    "required": True,
    "description": "service name, a DNS label",
    "schema": {"type": "string", "pattern": f"^{wire.SERVICE_NAME.pattern}$"},
}
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "instance id",
    "schema": {"type": "string", "pattern": f"^{wire.INSTANCE_ID.pattern}$"},
}
_LOCK_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "lock name (the caller's own, or shared by a grant)",
    "schema": {"type": "string", "pattern": f"^{locks.LOCK_NAME.pattern}$"},
}
_NOT_HELD = _json("Error", "the token does not hold the lock: its lease ended, or it was released")
#: who may call, by access: the alternatives of an operation's ``security``. With no token
#: configured at all the API is open (a local mesh), which ``info.description`` says.
SECURITY: dict[Access, list[dict[str, list[str]]]] = {
    Access.OPEN: [],
    Access.TOKEN: [{"adminToken": []}, {"joinToken": []}, {"serviceToken": []}],
    Access.INSTANCE: [{"adminToken": []}, {"joinToken": []}, {"serviceToken": []}],
    Access.ADMIN: [{"adminToken": []}],
}


OPEN = Access.OPEN


def _op(
    op_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    params: tuple[dict[str, Any], ...] = (),
    body: str | None = None,
    access: Access = Access.ADMIN,
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    op["security"] = SECURITY[access]
    if access is not Access.OPEN:
        op["responses"] = {**responses, **_errors("401", "403")}
    return op


def _schemas() -> dict[str, Any]:
    string = {"type": "string"}
    instance_props = {
        "service": string,
        "id": string,
        "address": string,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "zone": string,
        "namespace": string,
        "weight": {"type": "integer", "minimum": 1, "maximum": 10000},
        "metadata": {"type": "object", "additionalProperties": string},
        "status": {"enum": [s.value for s in Status]},
        "last_heartbeat": {
            "anyOf": [{"type": "null"}, {"type": "string", "format": "date-time"}],
            "description": "last heartbeat this control plane saw (null since its restart)",
        },
    }
    policy_view_props = {
        "service": string,
        "policy": _ref("Policy"),
        "policy_set": {
            "type": "boolean",
            "description": "false when the service runs on the default policy",
        },
    }
    token_props = {
        "id": string,
        "service": string,
        "description": string,
        "created": {"type": "string", "format": "date-time"},
        "last_used": {
            "anyOf": [{"type": "null"}, {"type": "string", "format": "date-time"}],
            "description": "when it was last used (saved once a minute; null: never)",
        },
    }
    patch = wire.json_schema(schema.InstancePatch)
    patch["minProperties"] = 1
    return {
        "Error": _object(
            error={"type": "string", "description": "what is wrong, for a person"},
            field={"anyOf": [{"type": "null"}, string], "description": "the offending field"},
        ),
        "Health": _object(status=string),
        "Policy": wire.json_schema(wire.Policy),
        "PolicyView": _object(**policy_view_props),
        "Registration": wire.json_schema(schema.Registration),
        "InstancePatch": patch,
        "Instance": _object(**instance_props),
        "InstanceList": _object(
            service=string, instances={"type": "array", "items": _ref("Instance")}
        ),
        "Heartbeat": _object(service=string, id=string, status=instance_props["status"]),
        "ServiceSummary": _object(
            name=string,
            lb={"enum": list(wire.LB_POLICIES)},
            instances=_object(
                **{s.value: {"type": "integer", "minimum": 0} for s in Status},
                total={"type": "integer", "minimum": 0},
            ),
        ),
        "ServiceList": _object(
            services={"type": "array", "items": _ref("ServiceSummary")},
            protection={
                "type": "boolean",
                "description": "true while too many instances missed heartbeats at once "
                "and none expire",
            },
        ),
        "Service": _object(
            **policy_view_props, instances={"type": "array", "items": _ref("Instance")}
        ),
        "Endpoint": wire.json_schema(wire.Endpoint),
        "ServiceEntry": _optional(
            _object(policy=_ref("Policy"), endpoints={"type": "array", "items": _ref("Endpoint")}),
            # hash policies only: the packed ring (wire is its one definition)
            ring=wire.json_schema(wire.ServiceEntry)["properties"]["ring"],
        ),
        "Table": _object(
            type={"const": "table"},
            services={"type": "object", "additionalProperties": _ref("ServiceEntry")},
            version={"type": "integer", "minimum": 0},
            epoch={"type": "string", "description": "versions compare only within one epoch"},
            built={
                "type": "number",
                "minimum": 0,
                "description": "when the control plane built this version (wall-clock seconds)",
            },
            trust_domain=wire.json_schema(wire.Table)["properties"]["trust_domain"],
            trust_bundle=wire.json_schema(wire.Table)["properties"]["trust_bundle"],
        ),
        "Sidecar": _object(
            node=string,
            service=string,
            instance=string,
            token={
                "type": "string",
                "description": "the service token's id the stream was opened with, or admin, "
                "join, open (no token configured)",
            },
            acked_version={"type": "integer", "minimum": 0},
            last_nack={"anyOf": [{"type": "null"}, string]},
            connected_since={"type": "string", "format": "date-time"},
        ),
        "SidecarList": _object(sidecars={"type": "array", "items": _ref("Sidecar")}),
        "TokenRequest": wire.json_schema(schema.TokenRequest),
        "Token": _object(**token_props),
        "NewToken": _object(
            **token_props,
            secret={
                "type": "string",
                "description": "send as Authorization: Bearer <secret>; shown only here",
            },
        ),
        "TokenList": _object(tokens={"type": "array", "items": _ref("Token")}),
        "LockRequest": wire.json_schema(schema.LockRequest),
        "LockRenewal": wire.json_schema(schema.LockRenewal),
        "LockRelease": wire.json_schema(schema.LockRelease),
        "Lock": _object(
            name=string,
            token={
                "type": "integer",
                "minimum": 1,
                "description": "the fencing token: greater than every earlier one of this "
                "lock; pass it to the resource, which must refuse lower ones",
            },
            expires_in_ms={"type": "integer", "minimum": 0},
            shared={
                "type": "boolean",
                "description": "the name is shared by a grant with other services",
            },
        ),
        "LockLease": _object(
            token={"type": "integer", "minimum": 1},
            expires_in_ms={"type": "integer", "minimum": 0},
        ),
        "LockGrantRequest": wire.json_schema(schema.LockGrantRequest),
        "LockGrant": _object(name=string, services={"type": "array", "items": string}),
        "LockGrantList": _object(grants={"type": "array", "items": _ref("LockGrant")}),
        "RootRequest": wire.json_schema(schema.RootRequest),
        "Root": _object(
            sha256={"type": "string", "description": "hex SHA-256 of the DER certificate"},
            subject=string,
            not_after={"type": "string", "description": "end of validity, ISO 8601 UTC"},
            pem=string,
            signing={
                "type": "boolean",
                "description": "the signing CA is this root or chains to it (not deletable)",
            },
        ),
        "TrustBundle": _object(roots={"type": "array", "items": _ref("Root")}),
        "RingOwner": _object(
            key=string,
            instance=string,
            algorithm={"enum": ["ring_hash", "maglev"]},
            version={"type": "integer", "minimum": 0},
        ),
    }


def _object(**properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties),
        "additionalProperties": False,
        "properties": properties,
    }


def _optional(schema: dict[str, Any], **properties: Any) -> dict[str, Any]:
    """``schema`` with more properties that may be absent."""
    return {**schema, "properties": {**schema["properties"], **properties}}


def build_spec() -> dict[str, Any]:
    svc = "/v1/services/{service}"
    inst = svc + "/instances/{id}"
    s, i = (_SERVICE,), (_SERVICE, _ID)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshlet control plane",
            "version": _VERSION,
            "description": "Service registry and policies of a meshlet mesh. With "
            "--admin-token or --join-token set, every /v1 call needs `Authorization: Bearer "
            "<token>`: the admin token may do everything; a service token (minted at "
            "/v1/tokens) and the join token may open the stream, register, heartbeat and "
            "deregister instances, and take the service's locks (a service token only its own "
            "service's). With no token "
            "configured the API is open. /healthz, /readyz, /metrics and /openapi.json are "
            "always open.",
        },
        "paths": {
            "/healthz": {
                "get": _op(
                    "healthz", "the process is up", {"200": _json("Health", "up")}, access=OPEN
                )
            },
            "/readyz": {
                "get": _op(
                    "readyz",
                    "ready to serve (store loaded, not shutting down)",
                    {"200": _json("Health", "ready"), "503": _json("Health", "not ready")},
                    access=OPEN,
                )
            },
            "/metrics": {
                "get": _op(
                    "metrics",
                    "Prometheus metrics in the text exposition format (no token needed)",
                    {
                        "200": {
                            "description": "registry, push and process metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                    access=OPEN,
                )
            },
            "/openapi.json": {
                "get": _op(
                    "openapi",
                    "this document",
                    {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
                    access=OPEN,
                )
            },
            "/v1/services": {
                "get": _op(
                    "listServices",
                    "services with instance counts by status",
                    {"200": _json("ServiceList", "all services")},
                )
            },
            "/v1/table": {
                "get": _op(
                    "getTable",
                    "the routing table sidecars receive: every service's policy and its "
                    "healthy and draining endpoints, with its version",
                    {"200": _json("Table", "the table in force")},
                )
            },
            "/v1/sidecars": {
                "get": _op(
                    "listSidecars",
                    "connected sidecars, with the table version each acknowledged",
                    {"200": _json("SidecarList", "connected sidecars")},
                )
            },
            wire.STREAM_PATH: {
                "get": _op(
                    "stream",
                    "the sidecar push stream (WebSocket; JSON messages hello, heartbeat, ack, "
                    "nack, deregister up; welcome, table down). A service token opens it only for "
                    "its own service's hello; refusals close it with 4000 + status (4403 "
                    "another service, 4409 an instance another stream or REST owns, 4401 the "
                    "token was revoked)",
                    {
                        "101": {"description": "switching to WebSocket"},
                    },
                    access=Access.TOKEN,
                )
            },
            svc: {
                "get": _op(
                    "getService",
                    "one service: policy and instances",
                    {"200": _json("Service", "the service"), **_errors("400", "404")},
                    params=s,
                )
            },
            svc + "/policy": {
                "get": _op(
                    "getPolicy",
                    "the service's policy (defaults when none was set)",
                    {"200": _json("PolicyView", "the policy"), **_errors("400", "404")},
                    params=s,
                ),
                "put": _op(
                    "putPolicy",
                    "set the policy; absent keys take their defaults; creates the service",
                    {
                        "200": _json("PolicyView", "the policy in force"),
                        **_errors("400", "413", "415", "503"),
                    },
                    params=s,
                    body="Policy",
                ),
                "delete": _op(
                    "deletePolicy",
                    "back to the default policy",
                    {"204": {"description": "reset"}, **_errors("400", "404", "503")},
                    params=s,
                ),
            },
            svc + "/ring": {
                "get": _op(
                    "ringOwner",
                    "which instance owns a key in the service's ring, as every sidecar with "
                    "the pushed table (its version in the answer) maps it",
                    {
                        "200": _json("RingOwner", "the owner"),
                        "409": _json(
                            "Error",
                            "the service is not in the pushed table yet, or has no routable "
                            "endpoint",
                        ),
                        **_errors("400", "404"),
                    },
                    params=(
                        _SERVICE,
                        {
                            "name": "key",
                            "in": "query",
                            "required": True,
                            "description": "the request key (a header's, cookie's or query "
                            "parameter's value, the path, or the client address)",
                            "schema": {"type": "string"},
                        },
                    ),
                )
            },
            svc + "/instances": {
                "get": _op(
                    "listInstances",
                    "the service's instances",
                    {"200": _json("InstanceList", "instances"), **_errors("400", "404")},
                    params=s,
                ),
                "post": _op(
                    "registerInstance",
                    "register an instance (201), or update one with the same id (200)",
                    {
                        "200": _json("Instance", "updated"),
                        "201": _json("Instance", "registered"),
                        "409": _json(
                            "Error",
                            "a connected sidecar's stream owns the instance (for a non-admin), "
                            "or the registry is full (--max-instances, per service too)",
                        ),
                        **_errors("400", "413", "415", "503"),
                    },
                    params=s,
                    body="Registration",
                    access=Access.INSTANCE,
                ),
            },
            inst: {
                "get": _op(
                    "getInstance",
                    "one instance",
                    {"200": _json("Instance", "the instance"), **_errors("400", "404")},
                    params=i,
                ),
                "patch": _op(
                    "patchInstance",
                    "change the weight, or drain (status: draining) and undrain (healthy)",
                    {
                        "200": _json("Instance", "the instance"),
                        **_errors("400", "404", "413", "415", "503"),
                    },
                    params=i,
                    body="InstancePatch",
                ),
                "delete": _op(
                    "deregisterInstance",
                    "deregister",
                    {
                        "204": {"description": "removed"},
                        "409": _json(
                            "Error", "a connected sidecar's stream owns it (for a non-admin)"
                        ),
                        **_errors("400", "404", "503"),
                    },
                    params=i,
                    access=Access.INSTANCE,
                ),
            },
            "/v1/tokens": {
                "get": _op(
                    "listTokens",
                    "service tokens (never their secrets), with when each was last used",
                    {"200": _json("TokenList", "every service token")},
                ),
                "post": _op(
                    "createToken",
                    "mint a service token; its secret is in this answer and nowhere else",
                    {
                        "201": _json("NewToken", "the token, with its secret"),
                        "409": _json(
                            "Error", "no --admin-token is configured, or 10000 tokens exist"
                        ),
                        **_errors("400", "413", "415", "503"),
                    },
                    body="TokenRequest",
                ),
            },
            "/v1/tokens/{id}": {
                "delete": _op(
                    "revokeToken",
                    "revoke a service token; the streams it opened are closed at once",
                    {"204": {"description": "revoked"}, **_errors("404", "503")},
                    params=(
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "description": "token id",
                            "schema": {"type": "string"},
                        },
                    ),
                )
            },
            svc + "/locks/{name}": {
                "post": _op(
                    "acquireLock",
                    "take the service's lock (waiting up to wait_ms while another holds it): "
                    "a lease with a fencing token",
                    {
                        "200": _json("Lock", "taken"),
                        "409": _json("Error", "still held by another after wait_ms"),
                        **_errors("400", "413", "415", "429", "503"),
                    },
                    params=(_SERVICE, _LOCK_NAME),
                    body="LockRequest",
                    access=Access.INSTANCE,
                ),
                "delete": _op(
                    "releaseLock",
                    "let the lock go (its holder's token)",
                    {
                        "204": {"description": "released"},
                        "409": _NOT_HELD,
                        **_errors("400", "413", "415", "503"),
                    },
                    params=(_SERVICE, _LOCK_NAME),
                    body="LockRelease",
                    access=Access.INSTANCE,
                ),
            },
            svc + "/locks/{name}/renew": {
                "put": _op(
                    "renewLock",
                    "extend the lease to ttl_ms from now (its holder's token)",
                    {
                        "200": _json("LockLease", "renewed"),
                        "409": _NOT_HELD,
                        **_errors("400", "413", "415", "503"),
                    },
                    params=(_SERVICE, _LOCK_NAME),
                    body="LockRenewal",
                    access=Access.INSTANCE,
                )
            },
            "/v1/lock-grants": {
                "get": _op(
                    "listLockGrants",
                    "lock names shared by several services",
                    {"200": _json("LockGrantList", "every grant")},
                )
            },
            "/v1/lock-grants/{name}": {
                "put": _op(
                    "putLockGrant",
                    "share a lock name among services: their locks of that name are one lock",
                    {
                        "200": _json("LockGrant", "the grant in force"),
                        "409": _json("Error", f"{locks.MAX_GRANTS} grants exist"),
                        **_errors("400", "413", "415", "503"),
                    },
                    params=(_LOCK_NAME,),
                    body="LockGrantRequest",
                ),
                "delete": _op(
                    "deleteLockGrant",
                    "stop sharing a lock name (each service has its own lock of it again)",
                    {"204": {"description": "deleted"}, **_errors("400", "404", "503")},
                    params=(_LOCK_NAME,),
                ),
            },
            "/v1/trust-bundle": {
                "get": _op(
                    "getTrustBundle",
                    "the roots sidecars trust (pushed with the routing table)",
                    {"200": _json("TrustBundle", "every root")},
                ),
                "post": _op(
                    "addRoot",
                    "trust another root: a bring-your-own CA's, or the next one of a rotation",
                    {
                        "201": _json("Root", "added; pushed with the next table"),
                        "409": _json(
                            "Error", f"the root is there already, or {wire.MAX_ROOTS} roots are"
                        ),
                        **_errors("400", "413", "415", "503"),
                    },
                    body="RootRequest",
                ),
            },
            "/v1/trust-bundle/{sha256}": {
                "delete": _op(
                    "deleteRoot",
                    "stop trusting a root (once nothing it signed is in use)",
                    {
                        "204": {"description": "deleted; pushed with the next table"},
                        "409": _json("Error", "the signing CA is this root or chains to it"),
                        **_errors("404", "503"),
                    },
                    params=(
                        {
                            "name": "sha256",
                            "in": "path",
                            "required": True,
                            "description": "the root's fingerprint (hex SHA-256 of its DER)",
                            "schema": {"type": "string"},
                        },
                    ),
                )
            },
            "/v1/ca": {
                "get": _op(
                    "getCA",
                    "the signing CA's certificate, PEM (never its key)",
                    {
                        "200": {
                            "description": "the certificate, with any intermediates above it",
                            "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
                        }
                    },
                )
            },
            inst + "/heartbeat": {
                "put": _op(
                    "heartbeat",
                    "the instance is alive (no body needed)",
                    {"200": _json("Heartbeat", "seen"), **_errors("400", "404")},
                    params=i,
                    access=Access.INSTANCE,
                )
            },
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "--admin-token: everything",
                },
                "joinToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "--join-token: the stream and instance calls of any service",
                },
                "serviceToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "minted at /v1/tokens: the stream and instance calls of "
                    "its service",
                },
            },
        },
    }
