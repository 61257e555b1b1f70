"""The app's locks, forwarded to the control plane (issue 14): the sidecar calls
``/v1/services/SERVICE/locks/NAME`` as its own ``--service`` with its own ``--token``, so an
app holds no credential of its own and can only take its service's locks (or the names the
admin shared with its service).

One connection per call (lock calls are few: an acquisition, a renewal every third of a lease,
a release). A call may wait at the control plane for up to ``wait_ms`` (60 s at most), so it
gets that much and 15 s more (``TIMEOUT``) before it is abandoned.

With several control planes (replicas on one Redis, whose locks are one) a call goes to the
replica the push stream is on, then to the others in the order given, but only while none
could be connected to: a call that reached one is never sent twice (an acquisition must not
take two locks).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from sidecar.control import httpclient
from sidecar.control.failover import Replica
from sidecar.errors import ConnectError, PeerError

TIMEOUT: Final = 75.0
"""seconds a forwarded call may take: the longest wait_ms (60 s) and 15 s for the rest"""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    """the control plane's JSON, as it sent it"""


@dataclass(frozen=True, slots=True)
class LockStatistics:
    forwarded: int
    """calls the control plane answered (any status)"""
    failed: int
    """calls that got no answer (unreachable, timed out, broken answer): 503 to the app"""
    in_flight: int


class LockClient:
    """Forwards the app's lock calls to the control planes at ``urls`` as ``service``;
    ``current()`` is the replica the push stream is on, if any."""

    def __init__(
        self,
        urls: Sequence[str],
        service: str,
        token: str,
        tls: ssl.SSLContext | None,
        current: Callable[[], Replica | None] = lambda: None,
    ) -> None:
        self._urls = tuple(urls)
        self._path = f"/v1/services/{service}/locks/"
        self._current = current
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._tls = tls
        self.forwarded = self.failed = self.in_flight = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<LockClient {self._path} [{s.in_flight} in flight, {s.failed} failed]>"

    def _targets(self) -> list[Replica]:
        """The stream's replica first, then every control plane as configured."""
        current = self._current()
        configured = [Replica(url, "") for url in self._urls]
        return [current, *configured] if current is not None else configured

    def statistics(self) -> LockStatistics:
        return LockStatistics(self.forwarded, self.failed, self.in_flight)

    async def call(self, method: str, name: str, renew: bool, body: bytes) -> Answer:
        """The control plane's answer to ``method`` on lock ``name`` (its ``/renew`` with
        ``renew``); PeerError when there is none."""
        path = self._path + quote(name, safe="") + ("/renew" if renew else "")
        self.in_flight += 1
        try:
            async with asyncio.timeout(TIMEOUT):
                head, answer = await self._first_reachable(method, path, body)
        except TimeoutError:
            self.failed += 1
            raise PeerError(f"no answer within {TIMEOUT:g} s") from None
        except ssl.SSLError as e:
            self.failed += 1
            raise PeerError(f"TLS: {e.reason or e}") from e
        except OSError as e:  # (a connection reset mid-answer)
            self.failed += 1
            raise PeerError(e.strerror or str(e)) from e
        except PeerError:
            self.failed += 1
            raise
        finally:
            self.in_flight -= 1
        self.forwarded += 1
        return Answer(head.status, answer)

    async def _first_reachable(
        self, method: str, path: str, body: bytes
    ) -> tuple[httpclient.ResponseHead, bytes]:
        """The answer of the first target that takes the connection (ConnectError: none)."""
        refused: ConnectError | None = None
        for target in self._targets():
            url = target.url.rstrip("/") + path
            try:
                return await httpclient.request(
                    method, url, body, self._headers, self._tls, target.address
                )
            except ConnectError as e:  # nothing was sent: the next one may take it
                refused = e
        assert refused is not None  # (a sidecar with locks has a control plane)
        raise refused
