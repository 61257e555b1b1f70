"""The app's lock API on the admin port (issue 14), forwarded to the control plane:

    POST   /v1/locks/NAME        {"ttl_ms": N, "wait_ms": N}  -> 200 {"name", "token",
                                                                 "expires_in_ms", "shared"}
    PUT    /v1/locks/NAME/renew  {"token": T, "ttl_ms": N}    -> 200 {"token", "expires_in_ms"}
    DELETE /v1/locks/NAME        {"token": T}                 -> 204

The control plane's answers pass through with their status (400 naming the field, 409 held or
not held by the token, ...); a sidecar without a control plane (``--table``) answers 503, and
so does one whose control plane does not answer. Who may call: the local app. Calls pass the
admin port's rule for mutating calls (``access``: an IP or localhost Host, same origin, JSON)
from loopback peers only, with or without ``--admin-token``: the app does not hold the admin
token, and the sidecar's service token (which the lock is taken with) is for this host's app
alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from control_plane.flags import escape
from sidecar.admin.messages import Deferred, Request, Response, json_response
from sidecar.control.locks import LockClient
from sidecar.errors import PeerError

if TYPE_CHECKING:
    from sidecar.admin.view import SidecarView

PREFIX: Final = "/v1/locks/"
log = logging.getLogger("meshlet.admin")


def answer(sidecar: SidecarView, request: Request) -> Response | Deferred:
    """A lock call under ``PREFIX``, forwarded; 404 or 405 for what is not one."""
    name, slash, rest = request.path.removeprefix(PREFIX).partition("/")
    if not name or (slash and rest != "renew"):
        return json_response({"error": f"not found: {request.method} {request.path}"}, 404)
    allowed = "PUT" if slash else "POST, DELETE"
    if request.method not in allowed.split(", "):
        return json_response(
            {"error": f"method not allowed: {request.method} {request.path} (allowed: {allowed})"},
            405,
            {"Allow": allowed},
        )
    if sidecar.locks is None:
        return json_response(
            {
                "error": "locks need a control plane: this sidecar runs from a routing file "
                "(--table), not --control-plane"
            },
            503,
        )
    return _forward(sidecar.locks, request.method, name, bool(slash), request.body)


async def _forward(locks: LockClient, method: str, name: str, renew: bool, body: bytes) -> Response:
    try:
        got = await locks.call(method, name, renew, body)
    except PeerError as e:
        log.warning(
            "lock %s %s: the control plane did not answer: %s", method, escape(name[:128]), e
        )
        return json_response({"error": f"control plane unavailable: {e}"}, 503)
    if got.status == 204:
        return Response(204)
    return Response(got.status, got.body)
