"""Certificates, tokens and checks for bench_proxy's TLS targets (issue 15).

One CA serves the whole run: the control plane signs the sidecars' certificates with it
(``--ca-cert/--ca-key``), HAProxy's two hops and ``openssl s_time`` carry certificates it
signed. So the handshake measurements present the same kind of credential to meshlet's inbound
and to HAProxy's TLS bind: an ECDSA P-256 workload certificate with a SPIFFE URI SAN.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.ca import Authority, make_csr, spiffe_id

NAMESPACE = "default"


@dataclass(frozen=True)
class Pki:
    """PEM files of the run's CA and of two workloads it signed."""

    ca_cert: Path
    ca_key: Path
    server: Path
    """HAProxy's inner hop: certificate then key, one file (``bind ... ssl crt``)"""
    client: Path
    """the outer hop's and s_time's: certificate then key, one file"""
    trust_domain: str

    def identity(self, service: str) -> str:
        return spiffe_id(self.trust_domain, NAMESPACE, service)


def make_pki(directory: Path, trust_domain: str = "cluster.local") -> Pki:
    """A new CA and workload certificates for "bench-server" and "bench-client"."""
    now = time.time()
    ca = Authority.create(now, trust_domain)
    cert_pem, key_pem = ca.pem()
    pki = Pki(
        directory / "ca.pem",
        directory / "ca.key",
        directory / "server.pem",
        directory / "client.pem",
        trust_domain,
    )
    pki.ca_cert.write_bytes(cert_pem)
    _write_secret(pki.ca_key, key_pem)
    for path, service in ((pki.server, "bench-server"), (pki.client, "bench-client")):
        key, csr = make_csr(pki.identity(service))
        cert = ca.sign(csr, service=service, namespace=NAMESPACE, now=now)
        _write_secret(path, cert.public_bytes(serialization.Encoding.PEM) + _key_pem(key))
    return pki


def haproxy_tls(pki: Pki) -> tuple[str, str]:
    """(bind, server) line options for HAProxy -> TLS -> HAProxy as the mesh makes it: TLS 1.3
    only, ALPN http/1.1, each side's certificate verified against the CA."""
    common = f"ca-file {pki.ca_cert} verify required ssl-min-ver TLSv1.3 alpn http/1.1"
    return f"ssl crt {pki.server} {common}", f"ssl crt {pki.client} {common}"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_secret(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.write_bytes(data)


def mint(cp_url: str, admin_token: str, service: str) -> str:
    """A service token for a sidecar of ``service`` (``POST /v1/tokens`` as the admin)."""
    req = urllib.request.Request(
        f"{cp_url}/v1/tokens",
        data=json.dumps({"service": service}).encode(),
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        body: dict[str, Any] = json.loads(r.read())
    secret: str = body["secret"]
    return secret


def get(url: str, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
        body: bytes = r.read()
        return body


def metric(metrics_port: int, name: str, **labels: str) -> float:
    """A sample of a sidecar's metrics port (0 when absent)."""
    text = get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def inbound_handshakes(metrics_port: int) -> float:
    """Mesh TLS handshakes the sidecar's inbound listener completed."""
    return metric(
        metrics_port, "meshlet_listener_tls_handshakes_total", direction="inbound", result="ok"
    )


def haproxy_tls_sessions(stats_socket: Path) -> float:
    """TLS sessions HAProxy's frontends have opened (CumSslConns of ``show info``, read from
    its stats socket)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(stats_socket))
        s.sendall(b"show info\n")
        out = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    found = re.search(r"^CumSslConns: (\d+)$", out, re.M)
    if found is None:
        raise RuntimeError(f"HAProxy's show info has no CumSslConns:\n{out}")
    return float(found.group(1))


def idle_upstreams(metrics_port: int, service: str) -> float:
    """Idle connections the sidecar's pools keep to ``service``'s endpoints."""
    return metric(metrics_port, "meshlet_upstream_connections", service=service, state="idle")


def routes_over_tls(admin_port: int, service: str) -> bool:
    """The sidecar holds a certificate and its table marks ``service``'s endpoints tls."""
    data: dict[str, Any] = json.loads(get(f"http://127.0.0.1:{admin_port}/config_dump"))
    entry: dict[str, Any] = ((data.get("table") or {}).get("services") or {}).get(service) or {}
    endpoints: list[dict[str, Any]] = entry.get("endpoints") or []
    own = (data.get("identity") or {}).get("spiffe_id")
    return bool(own) and bool(endpoints) and all(e.get("tls") for e in endpoints)


def routes(admin_port: int, service: str) -> bool:
    """The sidecar's table has an endpoint for ``service``."""
    data: dict[str, Any] = json.loads(get(f"http://127.0.0.1:{admin_port}/config_dump"))
    entry: dict[str, Any] = ((data.get("table") or {}).get("services") or {}).get(service) or {}
    return bool(entry.get("endpoints"))


def check_hop(outbound: int, service: str, metrics_port: int, peer: str) -> None:
    """Through ``outbound`` to ``service``, the app sees x-meshlet-peer ``peer`` (the verified
    caller; "" on a plaintext hop) and the inbound sidecar (``metrics_port``) counts TLS
    handshakes exactly when the hop is TLS."""
    seen = get(f"http://127.0.0.1:{outbound}/peer", {"Host": service}).decode()
    handshakes = inbound_handshakes(metrics_port)
    if seen != peer or (handshakes > 0) != bool(peer):
        raise RuntimeError(
            f"{service}: the app saw x-meshlet-peer {seen!r} (want {peer!r}), "
            f"{handshakes:.0f} inbound TLS handshakes"
        )


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.1)


def s_time_connections(out: str) -> int:
    """Handshakes ``openssl s_time -new`` completed ("N connections in T.TTs; ...")."""
    found = re.search(r"^(\d+) connections in [\d.]+s", out, re.M)
    if found is None:
        raise RuntimeError(f"s_time printed no count:\n{out}")
    return int(found.group(1))


@dataclass(frozen=True)
class TlsServer:
    """A TLS listener to measure full handshakes against."""

    port: int
    cpu: Callable[[], float]
    """CPU-seconds the server's processes have used"""
    verified: Callable[[], float] | None = None
    """handshakes the server completed with a verified client, when it counts them"""


@dataclass(frozen=True)
class Handshakes:
    per_s: float
    """full handshakes per second (wall clock)"""
    cpu_ms: float
    """the server's CPU-milliseconds per handshake"""
    completed: int
    """handshakes s_time completed"""
    verified: float | None
    """of which the server counted as verified, when it counts them"""

    def __str__(self) -> str:
        counted = "" if self.verified is None else f", {self.verified:.0f} verified by the server"
        return (
            f"{self.per_s:7.0f} handshakes/s  server cpu/handshake {self.cpu_ms:.3f} ms "
            f"({self.completed} handshakes{counted})"
        )


def s_time(server: TlsServer, pki: Pki, seconds: float, core: str) -> Handshakes:
    """``openssl s_time -new`` on ``core``: a new TLS session per connection, with the
    client certificate the run's CA signed, and no request. Where the server counts verified
    handshakes nearly all must be: a TLS 1.3 client is done before the server has checked its
    certificate, so s_time alone would count refused ones too."""
    verified_before = server.verified() if server.verified else 0.0
    cpu_before, start = server.cpu(), time.monotonic()
    out = subprocess.run(
        [
            *("taskset", "-c", core, "openssl", "s_time", "-new"),
            *("-connect", f"127.0.0.1:{server.port}", "-time", str(max(1, round(seconds)))),
            *("-cert", str(pki.client), "-key", str(pki.client), "-CAfile", str(pki.ca_cert)),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall, used = time.monotonic() - start, server.cpu() - cpu_before
    count = s_time_connections(out)
    verified = server.verified() - verified_before if server.verified else None
    result = Handshakes(count / wall, used / count * 1000, count, verified)
    if verified is not None and verified < 0.95 * count:
        raise RuntimeError(f"port {server.port}: {result}")
    return result


def report_handshakes(handshakes: dict[str, list[Handshakes]]) -> None:
    print("full handshakes (openssl s_time -new, client certificate): median (min..max)")
    for name, runs in handshakes.items():
        print(
            f"  {name:<17} {spread([h.per_s for h in runs])} handshakes/s  "
            f"server cpu {spread([h.cpu_ms for h in runs], ' ms')} per handshake"
        )
    mesh, hap = handshakes.get("meshlet-inbound", []), handshakes.get("haproxy-tls-bind", [])
    ratios = [m.cpu_ms / h.cpu_ms for m, h in zip(mesh, hap, strict=True) if h.cpu_ms]
    if ratios:
        print(f"  cpu per handshake, meshlet / haproxy: {spread(ratios, 'x')}")


def spread(values: list[float], unit: str = "") -> str:
    """median (min..max)"""
    median = statistics.median(values)
    return f"{median:.3f}{unit} ({min(values):.3f}..{max(values):.3f})"
