"""``meshlet wait-ready`` against a real HTTP server standing in for a sidecar's /readyz."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import pytest

from meshlet.waitready import main


class Readiness(http.server.ThreadingHTTPServer):
    """Answers /readyz 503 ``not_before`` times, then 200; counts the looks."""

    def __init__(self, not_before: int) -> None:
        self.not_before, self.looks = not_before, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.looks += 1
                self.send_response(200 if server.looks > server.not_before else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}/readyz"


@pytest.fixture
def readiness() -> Iterator[Callable[[int], Readiness]]:
    servers: list[Readiness] = []

    def start(not_before: int) -> Readiness:
        server = Readiness(not_before)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_it_waits_for_the_sidecar_to_be_ready(readiness: Callable[[int], Readiness]) -> None:
    server = readiness(3)
    assert main(["--url", server.url, "--interval", "0.05", "--timeout", "10"]) == 0
    assert server.looks == 4


def test_it_gives_up_saying_what_it_saw(
    readiness: Callable[[int], Readiness], capsys: pytest.CaptureFixture[str]
) -> None:
    server = readiness(10**6)
    assert main(["--url", server.url, "--interval", "0.05", "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"meshlet wait-ready: the sidecar was not ready within 0.3 s ({server.url}: HTTP 503)\n"
    )


def test_nothing_listening_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["--url", "http://127.0.0.1:9/readyz", "--interval", "0.05", "--timeout", "0.2"]) == 1
    )
    assert "Connection refused" in capsys.readouterr().err
    assert main(["--url", "ftp://x/readyz"]) == 2
    assert "--url: 'ftp://x/readyz' is not an http:// URL" in capsys.readouterr().err
    assert main(["--timeout", "0"]) == 2
