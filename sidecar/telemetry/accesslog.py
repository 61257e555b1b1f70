"""The access log (``--access-log PATH|-``): a JSON line per request.

The data path only appends a tuple to a list. Every ``FLUSH_EVERY`` seconds the list is
handed to a thread that formats and writes it, so a slow disk or a stdout pipe nobody reads
never stalls the event loop. At most ``MAX_PENDING`` entries wait; beyond that they are
dropped and counted (``/metrics``: ``meshlet_access_log_dropped_total``), never queued without
bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

from sidecar.clock import monotonic
from sidecar.http import headers

if TYPE_CHECKING:
    from control_plane.wire import Endpoint
    from sidecar.http.http1 import RequestHead

log = logging.getLogger("meshlet.accesslog")

FLUSH_EVERY = 0.1
"""seconds between writes"""
MAX_PENDING = 100_000
"""entries waiting for the writer; more are dropped"""

#: (start, wall-clock seconds; direction; service; the request head, None when it was not
#: parseable; status, 0 if none was sent; seconds; the last try's endpoint; tries; the
#: sidecar's own error reason (``x-meshlet-error``), or ""; a gRPC call's grpc-status, or -1)
Entry = tuple[float, str, str, "RequestHead | None", int, float, "Endpoint | None", int, str, int]


class AccessLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self.dropped = 0
        self.written = 0
        self._pending: list[Entry] = []
        self._file: TextIO | None = None
        self._lock = threading.Lock()  # one writer thread at a time, whole batches
        self._task: asyncio.Task[None] | None = None
        self._error_logged = -60.0

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} [{self.written} written, {self.dropped} dropped]>"

    def open(self) -> None:
        """Open the file (appending) and start writing; OSError if it cannot be opened."""
        self._file = sys.stdout if self.path == "-" else open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._task = asyncio.get_running_loop().create_task(self._run(), name="access-log")

    def add(self, entry: Entry) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
        else:
            self._pending.append(entry)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self._flush()

    async def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[Entry]) -> None:
        text = "".join(map(line, batch))
        with self._lock:
            f = self._file
            if f is None:
                return
            try:
                f.write(text)
                f.flush()
                self.written += len(batch)
            except (OSError, ValueError) as e:  # a full disk, a closed pipe: drop, say so
                self.dropped += len(batch)
                now = monotonic()
                if now - self._error_logged >= 60:
                    self._error_logged = now
                    log.error(
                        "access log %s: %s (%d entries dropped so far)", self.path, e, self.dropped
                    )

    async def close(self) -> None:
        """Write what is pending and close (the sidecar's last step)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush()
        with self._lock:
            f, self._file = self._file, None
            if f is not None and f is not sys.stdout:
                f.close()


def line(entry: Entry) -> str:
    started, direction, service, head, status, seconds, endpoint, attempts, error, grpc = entry
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started))
        + f".{int(started % 1 * 1000):03d}Z",
        "direction": direction,
        "service": service,
        "request_id": None,
        "traceparent": None,
        "method": None,
        "authority": None,
        "path": None,
        "status": status,
        "grpc_status": grpc if grpc >= 0 else None,
        "duration_ms": round(seconds * 1000, 3),
        "upstream": f"{endpoint.address}:{endpoint.port}" if endpoint is not None else None,
        "attempts": attempts,
        "error": error or None,
    }
    if head is not None:
        record["request_id"] = head.request_id.decode("latin-1") or None
        record["method"] = head.method.decode("latin-1")
        record["authority"] = head.authority.decode("latin-1") if head.authority else None
        record["path"] = head.target.decode("latin-1")
        traceparent = headers.header_value(head.lines, b"traceparent")
        if traceparent is not None:
            record["traceparent"] = traceparent.decode("latin-1")
    return json.dumps(record, separators=(",", ":")) + "\n"
