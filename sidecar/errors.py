"""What the sidecar answers when it cannot forward a request, and its own exceptions.

Every synthetic answer is a short plain-text response carrying ``x-meshlet-error: <reason>``
(linkerd's ``l5d-proxy-error``), so callers and dashboards can tell the mesh's refusals from the
application's.

    SidecarError
     ├── ConfigError    bad flags or environment; the process exits 2
     ├── TableError     a routing table (file or push) that cannot be used; the old one stays
     ├── CertificateRejected  a workload certificate from the control plane not installed; its
     │                  ``reason`` is one of a few words (the metric's label)
     └── PeerError      a server the sidecar calls (the control plane's stream, the app's health
          │             check) broke HTTP/1.1 or RFC 6455, or went silent
          ├── ConnectError     no connection to it (refused, unreachable, unknown host)
          ├── HandshakeError   a WebSocket upgrade not answered with 101 and the right accept key
          └── FrameError       a frame RFC 6455 forbids, or a message over the size limit; the
                               stream was closed with its ``code`` (1002, 1007, 1009)
"""

from __future__ import annotations

import enum


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TableError(SidecarError):
    """A routing table was rejected; the message names the problem."""


class CertificateRejected(SidecarError):
    """A certificate the sidecar will not use; the one in force (if any) stays."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerError(SidecarError):
    """A server the sidecar calls failed it; the message says how."""


class ConnectError(PeerError):
    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot connect to {address}: {reason}")
        self.address = address


class HandshakeError(PeerError):
    """``status`` is what the server answered the upgrade with (101 when the headers were wrong)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FrameError(PeerError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Reason(enum.Enum):
    """Why the sidecar answered itself: (status, reason phrase, x-meshlet-error value)."""

    BAD_REQUEST = (400, "Bad Request", "bad-request")
    #: the caller may not call this service (``allow_from``, ``mtls: strict``)
    FORBIDDEN = (403, "Forbidden", "forbidden")
    NO_ROUTE = (404, "Not Found", "no-route")
    #: a destination outside the mesh, refused by ``outbound_policy: registry_only``
    OUTSIDE_MESH = (502, "Bad Gateway", "no-route")
    REQUEST_TIMEOUT = (408, "Request Timeout", "request-timeout")
    BODY_TOO_LARGE = (413, "Content Too Large", "body-too-large")
    HEAD_TOO_LARGE = (431, "Request Header Fields Too Large", "head-too-large")
    UPSTREAM_CONNECT_FAILURE = (502, "Bad Gateway", "upstream-connect-failure")
    UPSTREAM_RESET = (502, "Bad Gateway", "upstream-reset")
    UPSTREAM_PROTOCOL_ERROR = (502, "Bad Gateway", "upstream-protocol-error")
    NO_HEALTHY_UPSTREAM = (503, "Service Unavailable", "no-healthy-upstream")
    DRAINING = (503, "Service Unavailable", "draining")
    OVERLOADED = (503, "Service Unavailable", "overloaded")
    UPSTREAM_TIMEOUT = (504, "Gateway Timeout", "upstream-timeout")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def code(self) -> str:
        return self.value[2]


def connection_lost(exc: BaseException | None) -> str:
    """How a connection that ended is described in a failure's detail."""
    return f"{type(exc).__name__}: {exc}" if exc else "connection closed"


def error_response(reason: Reason, detail: str, *, close: bool) -> bytes:
    """The whole synthetic response: status line, headers and a one-line text body."""
    status, phrase, code = reason.value
    body = f"{code}: {detail}\n".encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"content-type: text/plain; charset=utf-8\r\n"
        f"x-meshlet-error: {code}\r\n"
        f"content-length: {len(body)}\r\n"
        f"{'connection: close' if close else 'connection: keep-alive'}\r\n\r\n"
    ).encode() + body
