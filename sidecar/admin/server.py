"""The sidecar's admin port (not the hot path): health, readiness, metrics, config, endpoint
statistics, drain, and the app's locks (``locks``, under ``/v1/locks/``); and the metrics
port, which serves only metrics and the probes. Both are ``httpd.Port``s; a ``Site`` answers
their requests.

Mutating calls on the admin port pass ``access.refusal`` first (loopback or the admin token,
same origin, JSON bodies), whatever their path; lock calls from loopback peers only, whatever
the admin token (``locks`` says why). A GET route answers HEAD too. Anything else is a JSON
404, or on the admin port a 405 for a path it has under another method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from control_plane.flags import escape
from sidecar.admin import locks
from sidecar.admin.access import CHALLENGE, MUTATING, AdminCall, refusal
from sidecar.admin.exposition import CONTENT_TYPE
from sidecar.admin.messages import Deferred, Request, Response, json_response, text_response

if TYPE_CHECKING:
    from sidecar.admin.view import SidecarView

Handler = Callable[["SidecarView", Request], Response]
log = logging.getLogger("meshlet.admin")


def healthz(sidecar: SidecarView, request: Request) -> Response:
    return json_response({"status": "ok"})


def readyz(sidecar: SidecarView, request: Request) -> Response:
    ready, why = sidecar.readiness()
    return json_response(
        {"status": "ready" if ready else "not ready", "reason": why}, 200 if ready else 503
    )


def config_dump(sidecar: SidecarView, request: Request) -> Response:
    return json_response(sidecar.config_dump())


def clusters(sidecar: SidecarView, request: Request) -> Response:
    data = sidecar.endpoint_stats()
    form = request.arg("format", "json")
    if form == "text":
        return text_response(clusters_text(data))
    if form != "json":
        return json_response({"error": f"format must be json or text, got {form!r}"}, 400)
    return json_response(data)


COLUMNS = ("endpoint", "state", "out_for_s", "in_flight", "rtt_ms", "penalty_ms", "weight", "ramp")


def clusters_text(data: dict[str, Any]) -> str:
    """``/clusters?format=text``: a line of counters and a table of endpoints per service."""
    out: list[str] = []
    for name, service in data["services"].items():
        c = service["counters"]
        out.append(
            f"{name}: {c.get('in_flight', 0)} in flight, {c.get('retries', 0)} retries "
            f"({c.get('retries_unsent', 0)} unsent, {c.get('retries_suppressed', 0)} over "
            f"budget), {c.get('ejections', 0)} "
            f"ejections, {c.get('panics', 0)} panics, {c.get('overloaded', 0)} overloaded"
        )
        rows = [COLUMNS]
        for e in service["endpoints"]:
            out_for = e.get("excluded_for_s")
            ramp = e.get("slow_start")
            rows.append(
                (
                    f"{e['address']}:{e['port']}",
                    e["state"],
                    "probe" if out_for is None and e["state"] == "probing" else f"{out_for or 0:g}",
                    str(e.get("in_flight", 0)),
                    f"{e.get('rtt_ms', 0):.2f}",
                    f"{e.get('penalty_ms', 0):.0f}",
                    str(e["weight"]),
                    "-" if ramp is None else f"{ramp:.2f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        out += [
            "  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
    return "\n".join(out) + "\n" if out else "no routing table loaded\n"


def metrics(sidecar: SidecarView, request: Request) -> Response:
    if sidecar.metrics is None:
        return json_response({"error": "metrics are off (--metrics off)"}, 404)
    return Response(200, content_type=CONTENT_TYPE, stream=sidecar.metrics.chunks())


def drain(sidecar: SidecarView, request: Request) -> Response:
    sidecar.drain()
    return json_response({"status": "draining"}, 202)


def not_found(request: Request) -> Response:
    return json_response({"error": f"not found: {request.method} {request.path}"}, 404)


def admin_call(request: Request) -> AdminCall:
    """What ``access.refusal`` reads: the TCP peer and the headers as sent."""
    headers = request.headers
    return AdminCall(
        method=request.method,
        peer=request.peer,
        host=headers.get("host"),
        origin=headers.get("origin"),
        fetch_site=headers.get("sec-fetch-site"),
        content_type=headers.get("content-type"),
        authorization=headers.get("authorization"),
        body=request.body,
    )


ADMIN_ROUTES: Mapping[str, tuple[str, Handler]] = {
    "/healthz": ("GET", healthz),
    "/readyz": ("GET", readyz),
    "/config_dump": ("GET", config_dump),
    "/clusters": ("GET", clusters),
    "/metrics": ("GET", metrics),
    "/drain": ("POST", drain),
}
METRICS_ROUTES: Mapping[str, tuple[str, Handler]] = {
    "/metrics": ("GET", metrics),
    "/healthz": ("GET", healthz),
    "/readyz": ("GET", readyz),
}


@dataclass(frozen=True, slots=True)
class Site:
    """What one port answers: a path's one method (GET answers HEAD too), and on the admin
    port (``guarded``) the access rule for mutating calls and a 405 for a known path."""

    sidecar: SidecarView
    routes: Mapping[str, tuple[str, Handler]]
    guarded: bool

    def answer(self, request: Request) -> Response | Deferred:
        app_call = self.guarded and request.path.startswith(locks.PREFIX)
        if self.guarded and request.method in MUTATING:
            refused = self._refusal(request, app_call)
            if refused is not None:
                return refused
        if app_call:
            return locks.answer(self.sidecar, request)
        route = self.routes.get(request.path)
        if route is None:
            return not_found(request)
        method, handler = route
        if request.method == method or (method == "GET" and request.method == "HEAD"):
            return handler(self.sidecar, request)
        if not self.guarded:
            return not_found(request)
        allowed = "GET, HEAD" if method == "GET" else method
        return json_response(
            {"error": f"method not allowed: {request.method} {request.path} (allowed: {allowed})"},
            405,
            {"Allow": allowed},
        )

    def _refusal(self, request: Request, app_call: bool) -> Response | None:
        """Mutating calls only when ``access.refusal`` finds nothing wrong; the app's calls
        (locks) from loopback whatever the admin token."""
        call = admin_call(request)
        refused = refusal(call, "" if app_call else self.sidecar.config.admin_token)
        if refused is None:
            return None
        log.warning(
            "admin %s %s from %s refused: %s",
            request.method,
            escape(request.path[:200]),
            call.peer,
            refused.error,
        )
        challenge = {"WWW-Authenticate": CHALLENGE} if refused.status == 401 else None
        return json_response({"error": refused.error}, refused.status, challenge)


def admin_site(sidecar: SidecarView) -> Site:
    return Site(sidecar, ADMIN_ROUTES, guarded=True)


def metrics_site(sidecar: SidecarView) -> Site:
    """``--metrics-listen``: what Prometheus and the kubelet need, and nothing that changes
    the sidecar or shows its configuration; every other request is a JSON 404."""
    return Site(sidecar, METRICS_ROUTES, guarded=False)
