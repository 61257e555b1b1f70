"""What the admin ports' server (``httpd``) and what answers there (``server.Site``) exchange:
a parsed request, and the response to write."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

JSON: Final = "application/json; charset=utf-8"
TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    """percent-decoded, without the query"""
    query: str
    """as sent, after the ``?``"""
    headers: Mapping[str, str]
    """lowercase name -> the first value sent (UTF-8, undecodable bytes as surrogates)"""
    peer: str | None
    """the TCP peer's address; None when unknown"""
    body: bytes = b""
    version: str = "1.1"
    keep_alive: bool = True

    def arg(self, name: str, default: str) -> str:
        """The first value of a query parameter, percent-decoded."""
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    stream: Iterator[bytes] | None = None
    """a body written as it is produced, instead of ``body``: a piece whenever the client has
    taken in what was written (chunked; to an HTTP/1.0 client, up to the connection's close)"""


Deferred = Coroutine[Any, Any, Response]
"""an answer that needs I/O first (a lock call forwarded to the control plane)"""
Answer = Callable[[Request], Response | Deferred]
"""what a port does with a request: a response at once, or one to await"""


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, json.dumps(data).encode(), JSON, tuple((headers or {}).items()))


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), TEXT)
