"""HTTP/1 header names and what a proxy does with each: forward it as it came, read it, or
drop it (hop-by-hop headers, RFC 9110 7.6.1, ``Proxy-*``, what ``Connection`` lists), and the
helpers over header lines (``name: value\r\n``, one bytes each) that ``http1`` builds.

Names are looked up as they are spelled first (lowercase, or Capitalized-Words as most
clients and servers send them) and lowered only when that misses: a head is rewritten in
one pass, and lowering each name took as much as the rest of the pass.
"""

from __future__ import annotations

from typing import Final

#: Connection tokens that are not taken as header names to drop: the plain options, and the
#: headers that frame or identify a message (a client listing Content-Length there would
#: otherwise have its body forwarded without framing: a request smuggled to the upstream)
KEPT_TOKENS: Final = frozenset(
    {
        b"keep-alive",
        b"close",
        b"upgrade",
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"x-request-id",
    }
)

# What the single pass does with each header. (Final: compiled, they are constants.)
FORWARD: Final = 0  # as it came
HOST: Final = 1
TE: Final = 2
CL: Final = 3
CONN: Final = 4
UPGRADE: Final = 5
EXPECT: Final = 6
RID: Final = 7
XFF: Final = 8
DROP: Final = 9
DEADLINE: Final = 10  # from here on the mesh's own headers
TIMEOUT: Final = 11
ATTEMPT: Final = 12
RETRY: Final = 13
GRPC_TIMEOUT: Final = 14  # gRPC's deadline (``grpctimeout``), written again with the time left
_SPECIAL_REQUEST: Final = {
    b"x-meshlet-deadline-ms": DEADLINE,
    b"x-meshlet-timeout-ms": TIMEOUT,
    b"x-meshlet-attempt": ATTEMPT,
    b"x-meshlet-retry": RETRY,
    b"grpc-timeout": GRPC_TIMEOUT,
    b"host": HOST,
    b"transfer-encoding": TE,
    b"content-length": CL,
    b"connection": CONN,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
    b"x-request-id": RID,
    b"x-forwarded-for": XFF,
    b"x-forwarded-proto": DROP,
    b"x-meshlet-peer": DROP,  # the inbound sidecar writes the caller it verified
    b"keep-alive": DROP,
    b"te": DROP,
    b"trailer": DROP,
}
_SPECIAL_RESPONSE: Final = {
    b"transfer-encoding": TE,
    b"content-length": CL,
    b"connection": CONN,
    b"upgrade": UPGRADE,
    b"keep-alive": DROP,
    b"te": DROP,
    b"trailer": DROP,
}
#: headers forwarded as they come whatever their case (none starts with ``proxy-``)
_PLAIN: Final = (
    b"accept",
    b"accept-encoding",
    b"accept-language",
    b"accept-ranges",
    b"age",
    b"authorization",
    b"cache-control",
    b"content-encoding",
    b"content-type",
    b"cookie",
    b"date",
    b"etag",
    b"expires",
    b"last-modified",
    b"location",
    b"origin",
    b"referer",
    b"server",
    b"set-cookie",
    b"traceparent",
    b"tracestate",
    b"user-agent",
    b"vary",
)


def _spellings(special: dict[bytes, int]) -> dict[bytes, int]:
    """Header name -> action, for names as lowercase and as Capitalized-Words (``ETag`` too),
    the spellings clients and servers send: a name found here as it came is not lowered."""
    table = dict.fromkeys(_PLAIN, FORWARD) | special
    for name, action in list(table.items()):
        table[b"-".join(w.capitalize() for w in name.split(b"-"))] = action
    table[b"ETag"] = FORWARD
    return table


REQUEST: Final = _spellings(_SPECIAL_REQUEST)
RESPONSE: Final = _spellings(_SPECIAL_RESPONSE)
#: the Connection values nearly every message has, split once
_COMMON_CONNECTION: Final = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def action_of(table: dict[bytes, int], name: bytes) -> int:
    """What to do with header ``name``: as spelled, else by its lowercase (``proxy-*`` is
    dropped)."""
    action = table.get(name, -1)
    if action >= 0:
        return action
    lname = name.lower()
    action = table.get(lname, FORWARD)
    if action == FORWARD and lname[:6] == b"proxy-":
        return DROP
    return action


def connection_tokens(value: bytes) -> frozenset[bytes]:
    common = _COMMON_CONNECTION.get(value)
    if common is not None:
        return common
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def split_codings(value: bytes) -> list[bytes]:
    return [c.strip() for c in value.split(b",") if c.strip()]


def without(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """``lines`` without the headers called ``names``."""
    return [line for line in lines if line.partition(b":")[0].lower() not in names]


def header_value(lines: list[bytes], lname: bytes) -> bytes | None:
    """The value of the first of ``lines`` whose header is called ``lname`` (lowercase)."""
    for line in lines:
        name, _, value = line.partition(b": ")
        if name.lower() == lname:
            return value[:-2]
    return None
