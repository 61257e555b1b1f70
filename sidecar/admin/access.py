"""Who may make the admin port's mutating calls (``POST /drain``, and any later POST, PUT,
PATCH or DELETE): one pure decision that the admin port's middleware applies. Reads stay open.

A loopback port is no defence by itself: every web page the developer opens runs on this host
and may send requests to it. The rules, checked in this order; the first one broken answers:

  1. Host: an IP literal or ``localhost``. A DNS-rebinding page reaches the port under its own
     name (``Host: evil.example:15000``).
  2. Same origin: a browser names the page that sent a request in ``Origin`` and
     ``Sec-Fetch-Site``. An ``Origin`` that is not ``http://`` plus this request's Host
     (``null`` included), or ``Sec-Fetch-Site: cross-site`` / ``same-site``, is refused.
  3. The caller: with ``--admin-token``, ``Authorization: Bearer <it>`` from every peer (401
     without it); without one, loopback peers only (IPv4-mapped ``::ffff:127.0.0.1`` counts).
  4. A JSON body: ``Content-Type: application/json``, and the body, when there is one, parses.
     A page may POST a form or ``text/plain`` anywhere without asking; a JSON POST to another
     origin needs a CORS preflight, which the admin port never grants.

Refusals are 403, except a missing or wrong admin token: 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Final

MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CHALLENGE: Final = 'Bearer realm="meshlet-sidecar"'


@dataclass(frozen=True, slots=True)
class AdminCall:
    """What the decision reads of a request (headers as sent; ``None`` when absent)."""

    method: str
    peer: str | None
    """the TCP peer's address (not a forwarded header); ``None`` when unknown"""
    host: str | None
    origin: str | None
    fetch_site: str | None
    """``Sec-Fetch-Site``"""
    content_type: str | None
    authorization: str | None
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    """403, or 401 for a missing or wrong admin token"""
    error: str
    """why, for the caller (the JSON body's ``error``)"""


def refusal(call: AdminCall, admin_token: str) -> Refusal | None:
    """Why ``call`` may not run, or ``None`` when it may (every read may)."""
    if call.method not in MUTATING:
        return None
    return (
        _host_refusal(call.host)
        or _origin_refusal(call)
        or _caller_refusal(call, admin_token)
        or _body_refusal(call)
    )


def is_loopback(address: str | None) -> bool:
    """``127.0.0.0/8``, ``::1``, and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _host_refusal(host: str | None) -> Refusal | None:
    if host is None:
        return Refusal(403, "a Host header is required")
    authority = _authority(host)
    if authority is None or not (authority[0] == "localhost" or _is_ip(authority[0])):
        return Refusal(
            403,
            f"Host {_shown(host)} is not an IP address or localhost: a page that renamed "
            "this port (DNS rebinding) may not call it",
        )
    return None


def _origin_refusal(call: AdminCall) -> Refusal | None:
    site = (call.fetch_site or "").strip().lower()
    if site in ("cross-site", "same-site"):
        return Refusal(403, f"cross-origin call refused (Sec-Fetch-Site: {site})")
    if call.origin is None or _same_origin(call.origin, call.host or ""):
        return None
    return Refusal(
        403,
        f"cross-origin call refused: Origin {_shown(call.origin)} is not this port "
        f"(Host {_shown(call.host)})",
    )


def _caller_refusal(call: AdminCall, admin_token: str) -> Refusal | None:
    if admin_token:
        scheme, _, given = (call.authorization or "").partition(" ")
        if call.authorization is None or scheme.lower() != "bearer":
            return Refusal(401, "this call needs Authorization: Bearer <admin token>")
        if not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), admin_token.encode()
        ):
            return Refusal(401, "wrong admin token")
        return None
    if not is_loopback(call.peer):
        return Refusal(
            403,
            f"{call.peer or 'an unknown peer'} is not a loopback address: without "
            "--admin-token only this host may make mutating calls",
        )
    return None


def _body_refusal(call: AdminCall) -> Refusal | None:
    media = (call.content_type or "").partition(";")[0].strip().lower()
    if media != "application/json":
        shown = _shown(call.content_type) if call.content_type is not None else "none"
        return Refusal(
            403,
            f"Content-Type must be application/json (got {shown}): a browser sends other "
            "types across origins without asking",
        )
    if call.body:
        try:
            json.loads(call.body)
        except ValueError:
            return Refusal(403, "the body is not valid JSON")
    return None


def _same_origin(origin: str, host: str) -> bool:
    """``Origin: http://H:P`` names the same host and port as ``Host: H:P`` (port 80 when
    absent). ``null``, another scheme or anything malformed is another origin."""
    scheme, sep, rest = origin.partition("://")
    theirs, ours = _authority(rest), _authority(host)
    if not sep or scheme.lower() != "http" or theirs is None or ours is None:
        return False
    return (theirs[0], theirs[1] or 80) == (ours[0], ours[1] or 80)


def _authority(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` or ``[IPv6]:port`` as (lowercased host, port or None); None when it
    is not one."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = value.partition(":")
        port = port_text if colon else None
    if not host or (port is not None and not (port.isascii() and port.isdigit())):
        return None
    if port is not None and int(port) > 65535:
        return None
    return host.lower(), int(port) if port is not None else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _shown(value: str | None) -> str:
    """A header value in a message: quoted, at most 80 characters."""
    return repr((value or "")[:80])
