"""gRPC through two real sidecars over mutual TLS (issues 15 and 16): the control plane signs
their certificates, the caller's sidecar calls the callee's over HTTP/2 inside mesh TLS,
chosen by ALPN. That the hop was h2 over TLS is read off the sidecars' own counters
(``meshlet_listener_tls_sessions_total{alpn="h2"}`` on the callee's inbound, and
``meshlet_upstream_tls_handshakes_total{alpn="h2"}`` on the caller), and the app learns the
caller the inbound verified (``x-meshlet-peer``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from tests.integration.test_mesh import (
    App,
    StartCP,
    StartSidecar,
    call,
    dump,
    mesh_sidecar,
    quick_cp,
)
from tests.integration.test_mesh import apps as apps  # (the fixture)
from tests.integration.test_mtls import WEB, meshed, metric
from tests.processes import Sidecar, eventually
from tests.sidecar.test_grpc import pb as pb  # (the fixture: the service, compiled)

pytestmark = pytest.mark.slow

Pb = tuple[ModuleType, ModuleType]


@pytest.fixture
def greeter(pb: Pb) -> Iterator[int]:
    """A gRPC server (grpcio, h2c) whose answers carry the x-meshlet-peer it was given: its
    port."""
    msgs, stubs = pb

    def peer_of(context: grpc.ServicerContext) -> str:
        peer = dict(context.invocation_metadata()).get("x-meshlet-peer", "-")
        return str(peer)

    class Greeter(stubs.GreeterServicer):  # type: ignore[name-defined,misc]
        def Hello(self, ask: Any, context: grpc.ServicerContext) -> Any:
            return msgs.Answer(text=f"hello {ask.name}", server=peer_of(context))

        def Count(self, ask: Any, context: grpc.ServicerContext) -> Any:
            for i in range(ask.n):
                yield msgs.Answer(text=str(i), server=peer_of(context))

        def Chat(self, asks: Any, context: grpc.ServicerContext) -> Any:
            for ask in asks:
                yield msgs.Answer(text=f"re: {ask.name}", server=peer_of(context))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    stubs.add_GreeterServicer_to_server(Greeter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def h2_sessions(sidecar: Sidecar, alpn: str) -> float:
    # (labels in the order the exposition writes them: by name)
    return metric(sidecar, "meshlet_listener_tls_sessions_total", alpn=alpn, direction="inbound")


def test_grpc_crosses_two_sidecars_as_h2_over_mutual_tls(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    greeter: int,
    pb: Pb,
    tmp_path: Path,
) -> None:
    msgs, stubs = pb
    cp = quick_cp(control_plane, tmp_path)
    grpc_app = cast(App, SimpleNamespace(port=greeter))
    catalog = mesh_sidecar(
        sidecar_process,
        cp,
        "catalog",
        grpc_app,
        tmp_path,
        "--app-protocol",
        "http2",
        "--app-health",
        "none",
    )
    web = mesh_sidecar(sidecar_process, cp, "web", apps("web"), tmp_path)
    assert cp.call("PUT", "/v1/services/catalog/policy", {"protocol": "auto"})[0] == 200
    eventually(lambda: meshed(web, "catalog"), what="web has catalog over mesh TLS")
    channel = grpc.insecure_channel(
        f"127.0.0.1:{web.ports['outbound']}",
        options=[("grpc.default_authority", "catalog"), ("grpc.enable_http_proxy", 0)],
    )
    stub = stubs.GreeterStub(channel)

    def hello() -> Any:
        return stub.Hello(msgs.Ask(name="mesh"), timeout=5)

    with channel:
        eventually(lambda: _policy_auto(web), what="web has catalog's protocol: auto")
        eventually(lambda: _answers(hello) is not None, what="web calls catalog")
        answer = hello()
        assert (answer.text, answer.server) == ("hello mesh", WEB)
        counted = [a.text for a in stub.Count(msgs.Ask(n=50), timeout=10)]
        assert counted == [str(i) for i in range(50)]
        chat = [a.text for a in stub.Chat(iter([msgs.Ask(name=n) for n in "abc"]), timeout=10)]
        assert chat == ["re: a", "re: b", "re: c"]
        # the hop between the sidecars was HTTP/2 inside mesh TLS, on both sides' word
        assert h2_sessions(catalog, "h2") >= 1
        assert (
            metric(web, "meshlet_upstream_tls_handshakes_total", alpn="h2", service="catalog") >= 1
        )
        assert h2_sessions(catalog, "http/1.1") == 0
        status, clusters = web.admin("/clusters")
        assert status == 200
        (endpoint,) = clusters["services"]["catalog"]["endpoints"]
        assert endpoint["mesh_tls"]["h2"] >= 1
        assert endpoint["mesh_tls"]["h2_fallback"] is False

        # an HTTP/1.1 caller (auto keeps its protocol) still negotiates http/1.1
        call(web, "catalog", "/plain")  # (a gRPC server answers it as it may: not our test)
        assert h2_sessions(catalog, "http/1.1") >= 1
        assert (
            metric(web, "meshlet_upstream_tls_handshakes_total", alpn="http/1.1", service="catalog")
            >= 1
        )

        # allow_from refuses web over h2 as over HTTP/1.1
        policy = {"protocol": "auto", "allow_from": ["orders"]}
        assert cp.call("PUT", "/v1/services/catalog/policy", policy)[0] == 200
        eventually(lambda: _refused(hello), what="web refused over h2")
        with pytest.raises(grpc.RpcError) as refused:
            hello()
        error = cast(grpc.Call, refused.value)
        metadata = dict(error.initial_metadata() or ()) | dict(error.trailing_metadata() or ())
        assert (
            error.code() == grpc.StatusCode.PERMISSION_DENIED
            or metadata.get("x-meshlet-error") == "forbidden"
        ), (error.code(), metadata)
        assert metric(catalog, "meshlet_inbound_forbidden_total", caller="web") >= 1


def _answers(hello: Callable[[], Any]) -> Any:
    try:
        return hello()
    except grpc.RpcError:
        return None


def _refused(hello: Callable[[], Any]) -> bool:
    try:
        hello()
    except grpc.RpcError as e:
        return cast(grpc.Call, e).code() == grpc.StatusCode.PERMISSION_DENIED or "forbidden" in str(
            e
        )
    return False


def _policy_auto(sidecar: Sidecar) -> bool:
    table: dict[str, Any] = dump(sidecar).get("table") or {}
    entry: dict[str, Any] = (table.get("services") or {}).get("catalog") or {}
    return bool((entry.get("policy") or {}).get("protocol") == "auto")
