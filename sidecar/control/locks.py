"""The app's locks, forwarded to the control plane (issue 14): the sidecar calls
``/v1/services/SERVICE/locks/NAME`` as its own ``--service`` with its own ``--token``, so an
app holds no credential of its own and can only take its service's locks (or the names the
admin shared with its service).

One connection per call (lock calls are few: an acquisition, a renewal every third of a lease,
a release). A call may wait at the control plane for up to ``wait_ms`` (60 s at most), so it
gets that much and 15 s more (``TIMEOUT``) before it is abandoned.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from sidecar.control import httpclient
from sidecar.errors import PeerError

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
    """Forwards the app's lock calls to ``control_plane`` as ``service``."""

    def __init__(
        self, control_plane: str, service: str, token: str, tls: ssl.SSLContext | None
    ) -> None:
        self._base = f"{control_plane.rstrip('/')}/v1/services/{service}/locks/"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._tls = tls
        self.forwarded = self.failed = self.in_flight = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<LockClient {self._base} [{s.in_flight} in flight, {s.failed} failed]>"

    def statistics(self) -> LockStatistics:
        return LockStatistics(self.forwarded, self.failed, self.in_flight)

    async def call(self, method: str, name: str, renew: bool, body: bytes) -> Answer:
        """The control plane's answer to ``method`` on lock ``name`` (its ``/renew`` with
        ``renew``); PeerError when there is none."""
        url = self._base + quote(name, safe="") + ("/renew" if renew else "")
        self.in_flight += 1
        try:
            async with asyncio.timeout(TIMEOUT):
                head, answer = await httpclient.request(method, url, body, self._headers, self._tls)
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
