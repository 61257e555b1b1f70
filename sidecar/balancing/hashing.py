"""The request key a hash policy maps through the ring: ``header:NAME``, ``cookie:NAME``,
``query:NAME``, ``path`` or ``source_ip``. A request without the key gets None (and is
balanced by peak EWMA instead)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from sidecar.http import headers
from sidecar.http.http1 import RequestHead

KeyOf = Callable[[RequestHead, bytes], bytes | None]


def key_function(hash_on: str | None) -> KeyOf | None:
    if hash_on is None:
        return None
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        return _header(name.lower().encode())
    if kind == "cookie":
        return _cookie(name.encode())
    if kind == "query":
        return _query(name.encode())
    if kind == "path":
        return lambda head, client_ip: head.target.partition(b"?")[0]
    if kind == "source_ip":
        return lambda head, client_ip: client_ip
    raise ValueError(f"unknown hash_on {hash_on!r}")


def _header(name: bytes) -> KeyOf:
    def key(head: RequestHead, client_ip: bytes) -> bytes | None:
        return headers.header_value(head.lines, name)

    return key


def _cookie(name: bytes) -> KeyOf:
    def key(head: RequestHead, client_ip: bytes) -> bytes | None:
        for line in head.lines:
            lname, _, value = line.partition(b": ")
            if lname.lower() == b"cookie":
                for pair in value[:-2].split(b";"):
                    k, eq, v = pair.strip().partition(b"=")
                    if eq and k == name:
                        return v
        return None

    return key


def _query(name: bytes) -> KeyOf:
    def key(head: RequestHead, client_ip: bytes) -> bytes | None:
        _, sep, query = head.target.partition(b"?")
        if not sep:
            return None
        for pair in query.split(b"&"):
            k, _eq, v = pair.partition(b"=")
            if unquote_to_bytes(k.replace(b"+", b" ")) == name:
                return unquote_to_bytes(v.replace(b"+", b" "))
        return None

    return key
